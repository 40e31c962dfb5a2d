// Truffle compiles offline with the npm solc in node_modules (a version number or range would make
// it try to download one), for the EVM version Ganache 7.9 knows, and deploys to the Ganache the
// Python side uses.
const path = require("path");

const chainUrl = new URL(process.env.FL_CHAIN_URL || "http://127.0.0.1:8545");

module.exports = {
  // build/contracts is where chain.find_deployment looks; tests build elsewhere so that they never
  // overwrite the address recorded for a developer's own chain (same network id 5777).
  contracts_build_directory: process.env.FL_TRUFFLE_BUILD_DIR || path.join(__dirname, "build", "contracts"),
  networks: {
    // The chain at FL_CHAIN_URL, as for the Python side (default: run.py's Ganache on 8545).
    development: {
      host: chainUrl.hostname,
      port: Number(chainUrl.port || 8545),
      network_id: "*",
    },
  },
  compilers: {
    solc: {
      version: path.join(__dirname, "node_modules", "solc"),
      settings: {
        // Ganache 7.9 knows no later hardfork; solc >= 0.8.25 defaults to cancun.
        evmVersion: "shanghai",
        optimizer: { enabled: true, runs: 200 },
      },
    },
  },
};
