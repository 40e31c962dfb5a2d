// Deploys the round registry from the first node account (Ganache's deterministic account 0, the
// organization). OPEN_ENROLMENT=1 lets any account submit instead of an owner-managed allowlist;
// MAX_SAMPLES caps the sample count (the FedAvg weight) a submission may report.
const RoundRegistry = artifacts.require("RoundRegistry");

module.exports = function (deployer) {
  const openEnrolment = ["1", "true", "yes"].includes((process.env.OPEN_ENROLMENT || "").toLowerCase());
  const maxSamples = process.env.MAX_SAMPLES || "1000000";
  deployer.deploy(RoundRegistry, openEnrolment, maxSamples);
};
