//! The `PolicyLedger` contract: its committed artifact, the Rust bindings generated from that
//! artifact's ABI, and the revert reasons the client maps to errors.
//!
//! The Solidity source (`master/chain/contract/PolicyLedger.sol`) is compiled by
//! `scripts/compile-contract.sh` (solc-js from npm, `shanghai` EVM) into
//! `master/chain/contract/PolicyLedger.json`, which is committed: building this crate needs no
//! Solidity compiler. The bindings below are generated from that same JSON, so the ABI the client
//! encodes is the ABI of the bytecode it deploys.

use alloy::primitives::Bytes;

alloy::sol!(
    /// The bindings of the contract: one `…Call` struct per function (`insertCall`,
    /// `policy_idsCall`, …) with its ABI encoding and the decoding of its return value.
    #[allow(missing_docs)]
    #[derive(Debug)]
    PolicyLedger,
    "contract/PolicyLedger.json"
);

/// The committed artifact: contract name, source hash, compiler, ABI and bytecode (JSON).
pub const ARTIFACT_JSON: &str = include_str!("../contract/PolicyLedger.json");

/// The Solidity source the artifact was compiled from (its sha256 is the artifact's
/// `sourceSha256`; a test checks it).
pub const SOURCE: &str = include_str!("../contract/PolicyLedger.sol");

/// The creation bytecode of the committed artifact: what a deployment sends (the contract
/// takes no constructor arguments).
pub fn creation_bytecode() -> Bytes {
    artifact_bytes("bytecode")
}

/// The runtime bytecode of the committed artifact: what `eth_getCode` returns at a deployed
/// `PolicyLedger` (used to tell whether an address holds this contract).
pub fn runtime_bytecode() -> Bytes {
    artifact_bytes("deployedBytecode")
}

fn artifact_bytes(field: &str) -> Bytes {
    // The artifact is compiled into the binary and checked by this crate's tests, so a failure
    // here is a broken build, not a runtime condition.
    let artifact: serde_json::Value =
        serde_json::from_str(ARTIFACT_JSON).expect("the committed artifact is JSON");
    let hex = artifact[field]
        .as_str()
        .unwrap_or_else(|| panic!("the committed artifact has no {field}"));
    hex.parse()
        .unwrap_or_else(|e| panic!("the artifact's {field} is not hex: {e}"))
}

/// The revert reasons (`Error(string)`) of the contracts the client talks to, and what they mean.
///
/// The master turns [`Refusal::Exists`](revert::Refusal::Exists) into `ALREADY_EXISTS` and [`Refusal::NotFound`](revert::Refusal::NotFound) into
/// `NOT_FOUND`. A contract deployed from EdgeLake's own source gives other texts for the same
/// refusals; they are recognised too, so a master can follow (and write to) a contract an
/// EdgeLake network already uses.
pub mod revert {
    /// `insert` of an id that is stored: PolicyLedger's reason.
    pub const POLICY_EXISTS: &str = "policy exists";
    /// `updatePolicy`, `deletePolicy` or `getPolicy` of an unknown id: PolicyLedger's reason.
    pub const POLICY_NOT_FOUND: &str = "policy not found";
    /// `updatePolicy` by an account that did not insert the policy: PolicyLedger's reason.
    pub const NOT_POLICY_OWNER: &str = "not the policy owner";

    /// EdgeLake's contract's reason for [`POLICY_EXISTS`].
    pub const EDGELAKE_POLICY_EXISTS: &str = "Policy with policy id already exists";
    /// EdgeLake's contract's reasons for [`POLICY_NOT_FOUND`] (its delete and update say the
    /// first, its `getPolicy` the second).
    pub const EDGELAKE_POLICY_NOT_FOUND: [&str; 2] =
        ["Policy ID does not exist", "Policy does not exist"];
    /// EdgeLake's contract's reason for [`NOT_POLICY_OWNER`].
    pub const EDGELAKE_NOT_POLICY_OWNER: &str = "Only policy owner can update policy";

    /// What a known revert reason refuses.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Refusal {
        /// The id is stored already.
        Exists,
        /// The id is not stored.
        NotFound,
        /// The sender is not the account that inserted the policy.
        NotOwner,
    }

    /// The refusal a revert reason stands for; `None` for any other reason (out of gas, a
    /// panic, another contract's text), which the client reports as it is.
    pub fn classify(reason: &str) -> Option<Refusal> {
        match reason {
            POLICY_EXISTS | EDGELAKE_POLICY_EXISTS => Some(Refusal::Exists),
            POLICY_NOT_FOUND => Some(Refusal::NotFound),
            NOT_POLICY_OWNER | EDGELAKE_NOT_POLICY_OWNER => Some(Refusal::NotOwner),
            other if EDGELAKE_POLICY_NOT_FOUND.contains(&other) => Some(Refusal::NotFound),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use alloy::sol_types::SolCall;
    use sha2::Digest;

    use super::*;

    fn artifact() -> serde_json::Value {
        serde_json::from_str(ARTIFACT_JSON).unwrap()
    }

    /// An edited source whose artifact was not regenerated fails here, without solc
    /// (scripts/compile-contract.sh --check, run by scripts/test.sh, compares the bytecode too).
    #[test]
    fn the_artifact_was_compiled_from_the_source() {
        let hash = hex::encode(sha2::Sha256::digest(SOURCE.as_bytes()));
        assert_eq!(
            artifact()["sourceSha256"].as_str(),
            Some(hash.as_str()),
            "PolicyLedger.json is stale: run scripts/compile-contract.sh and commit the artifact"
        );
        assert_eq!(artifact()["settings"]["evmVersion"], "shanghai");
    }

    /// The revert reasons the client maps are the ones the contract gives, word for word.
    #[test]
    fn the_revert_reasons_are_the_contracts() {
        for reason in [
            revert::POLICY_EXISTS,
            revert::POLICY_NOT_FOUND,
            revert::NOT_POLICY_OWNER,
        ] {
            assert!(
                SOURCE.contains(&format!("= \"{reason}\";")),
                "PolicyLedger.sol does not define the reason {reason:?}"
            );
        }
        assert_eq!(
            revert::classify(revert::POLICY_EXISTS),
            Some(revert::Refusal::Exists)
        );
        assert_eq!(
            revert::classify("Policy ID does not exist"),
            Some(revert::Refusal::NotFound)
        );
        assert_eq!(revert::classify("out of gas"), None);
    }

    /// The interface EdgeLake nodes call: the selectors of their function signatures.
    #[test]
    fn the_selectors_are_edgelakes() {
        let expected = [
            (PolicyLedger::insertCall::SIGNATURE, "insert(string,string)"),
            (
                PolicyLedger::updatePolicyCall::SIGNATURE,
                "updatePolicy(string,string)",
            ),
            (
                PolicyLedger::deletePolicyCall::SIGNATURE,
                "deletePolicy(string)",
            ),
            (PolicyLedger::getPolicyCall::SIGNATURE, "getPolicy(string)"),
            (
                PolicyLedger::getPolicyOwnerCall::SIGNATURE,
                "getPolicyOwner(string)",
            ),
            (PolicyLedger::num_policiesCall::SIGNATURE, "num_policies()"),
            (PolicyLedger::policiesCall::SIGNATURE, "policies(uint256)"),
            (
                PolicyLedger::policy_idsCall::SIGNATURE,
                "policy_ids(uint256)",
            ),
            (
                PolicyLedger::transaction_countCall::SIGNATURE,
                "transaction_count()",
            ),
        ];
        for (signature, want) in expected {
            assert_eq!(signature, want);
        }
        assert!(creation_bytecode().len() > runtime_bytecode().len());
        assert!(!runtime_bytecode().is_empty());
    }
}
