// SPDX-License-Identifier: Apache-2.0
//
// The policies of an AnyLog/EdgeLake network on an Ethereum chain, with the functions EdgeLake
// nodes call (the same names and argument types), written for Ledger from that interface and its
// documented behaviour. Ledger's master follows it by reading its state: inserts emit no event
// and the delete event does not name the policy, as with EdgeLake's contract, so nothing here
// relies on logs. Unlike EdgeLake's, getPolicy and getPolicyOwner are views that return their
// answer (EdgeLake's emit it as an event from a transaction); the selectors are the same.
//
// Compiled for the `shanghai` EVM (ganache 7's newest) by scripts/compile-contract.sh into
// PolicyLedger.json beside this file; the Rust crate `ledger-chain` reads only that artifact.
pragma solidity 0.8.37;

/// @title PolicyLedger: policy id -> JSON text, in an array nodes read by index
/// @notice Anyone may insert; only the account that inserted a policy may update it; anyone may
/// delete (as on EdgeLake's chains: a network that needs more keeps its writers' keys to itself).
contract PolicyLedger {
    /// The revert reasons, part of the interface: Ledger maps them to its own errors
    /// (ledger_chain::revert), so they never change once deployed.
    string private constant POLICY_EXISTS = "policy exists";
    string private constant POLICY_NOT_FOUND = "policy not found";
    string private constant NOT_POLICY_OWNER = "not the policy owner";

    /// The policies' JSON texts; `policy_ids[i]` is the id of `policies[i]`. Public so that the
    /// compiler makes the `policies(uint256)` and `policy_ids(uint256)` getters nodes read.
    /// Each text is stored once (here), not also in `slots`: storage costs ~20,000 gas per
    /// 32 bytes, so a second copy would double the gas of every insert.
    string[] public policies;
    string[] public policy_ids;

    /// Incremented by every insert, update and delete: a reader that finds it unchanged knows
    /// nothing changed, without reading a single policy.
    uint256 public transaction_count;

    /// Where a policy is and who wrote it, in one storage slot (a uint96 index and an address
    /// fill 32 bytes): `index` is the array position + 1, so 0 means "no such policy".
    struct Slot {
        address owner;
        uint96 index;
    }

    mapping(string => Slot) private slots;

    /// Emitted by deletePolicy. It does not carry the id (EdgeLake's delete event does not
    /// either): followers read the arrays instead.
    event delete_policy_event(bool);

    /// Emitted by updatePolicy with the id and the new text.
    event updated_policy_event(string, string);

    /// Appends a policy. Reverts with POLICY_EXISTS when the id is taken. No event: followers
    /// see it in `transaction_count` and the arrays.
    function insert(string calldata policy_id, string calldata json) external {
        Slot storage slot = slots[policy_id];
        require(slot.index == 0, POLICY_EXISTS);
        policies.push(json);
        policy_ids.push(policy_id);
        slot.owner = msg.sender;
        // At most 2^96 - 1 policies: more than any chain's gas could ever store.
        slot.index = uint96(policies.length);
        transaction_count += 1;
    }

    /// Replaces the text of a policy in place (its position does not change). Only the account
    /// that inserted it may: NOT_POLICY_OWNER otherwise; POLICY_NOT_FOUND for an unknown id.
    function updatePolicy(string calldata policy_id, string calldata json) external {
        Slot storage slot = slots[policy_id];
        require(slot.index != 0, POLICY_NOT_FOUND);
        require(slot.owner == msg.sender, NOT_POLICY_OWNER);
        policies[slot.index - 1] = json;
        transaction_count += 1;
        emit updated_policy_event(policy_id, json);
    }

    /// Removes a policy: the last one moves into its place, so the order of the arrays
    /// changes (readers must not take an index as an identity across blocks). Reverts with
    /// POLICY_NOT_FOUND for an unknown id.
    function deletePolicy(string calldata policy_id) external {
        uint256 index = slots[policy_id].index;
        require(index != 0, POLICY_NOT_FOUND);
        uint256 hole = index - 1;
        uint256 last = policies.length - 1;
        if (hole != last) {
            policies[hole] = policies[last];
            string memory moved = policy_ids[last];
            policy_ids[hole] = moved;
            slots[moved].index = uint96(index);
        }
        policies.pop();
        policy_ids.pop();
        delete slots[policy_id];
        transaction_count += 1;
        emit delete_policy_event(true);
    }

    /// The text of a policy; reverts with POLICY_NOT_FOUND for an unknown id.
    function getPolicy(string calldata policy_id) external view returns (string memory) {
        uint256 index = slots[policy_id].index;
        require(index != 0, POLICY_NOT_FOUND);
        return policies[index - 1];
    }

    /// The account that inserted a policy; the zero address for an unknown id.
    function getPolicyOwner(string calldata policy_id) external view returns (address) {
        return slots[policy_id].owner;
    }

    /// How many policies there are: the length of both arrays.
    function num_policies() external view returns (uint256) {
        return policies.length;
    }
}
