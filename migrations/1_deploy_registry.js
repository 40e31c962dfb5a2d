// Deploys the round registry from the first node account (Ganache's deterministic account 0, the
// organization). OPEN_ENROLMENT=1 lets any account submit instead of an owner-managed allowlist.
const RoundRegistry = artifacts.require("RoundRegistry");

module.exports = function (deployer) {
  const openEnrolment = ["1", "true", "yes"].includes((process.env.OPEN_ENROLMENT || "").toLowerCase());
  deployer.deploy(RoundRegistry, openEnrolment);
};
