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

/// @title PolicyLedger: policy id -> JSON text, in an order nodes read by index
/// @notice Anyone may insert; only the account that inserted a policy may update it; anyone may
/// delete (as on EdgeLake's chains: a network that needs more keeps its writers' keys to itself).
contract PolicyLedger {
    /// The revert reasons, part of the interface: Ledger maps them to its own errors
    /// (ledger_chain::contract::revert), so they never change once deployed.
    string private constant POLICY_EXISTS = "policy exists";
    string private constant POLICY_NOT_FOUND = "policy not found";
    string private constant NOT_POLICY_OWNER = "not the policy owner";

    /// The ids in reading order: `policy_ids(i)` and `policies(i)` are the id and text of the
    /// i-th policy. Public so that the compiler makes the `policy_ids(uint256)` getter.
    string[] public policy_ids;

    /// Incremented by every insert, update and delete: a reader that finds it unchanged knows
    /// nothing changed, without reading a single policy.
    uint256 public transaction_count;

    /// A stored policy. Its text is stored here once, keyed by id, not in an array: a delete
    /// then moves only the last policy's id into the hole, never its text (a 16 KB text costs
    /// about 11 M gas to write, so moving it would make deleting another policy as dear as
    /// inserting that one). `owner` and `index` share one storage slot.
    struct Entry {
        string json;
        address owner;
        /// The position in `policy_ids` + 1, so 0 means "no such policy".
        uint96 index;
    }

    mapping(string => Entry) private entries;

    /// Emitted by deletePolicy. It does not carry the id (EdgeLake's delete event does not
    /// either): followers read the ids instead.
    event delete_policy_event(bool);

    /// Emitted by updatePolicy with the id and the new text.
    event updated_policy_event(string, string);

    /// Adds a policy at the end. Reverts with POLICY_EXISTS when the id is taken. No event:
    /// followers see it in `transaction_count` and the ids.
    function insert(string calldata policy_id, string calldata json) external {
        Entry storage entry = entries[policy_id];
        require(entry.index == 0, POLICY_EXISTS);
        policy_ids.push(policy_id);
        entry.json = json;
        entry.owner = msg.sender;
        // At most 2^96 - 1 policies: more than any chain's gas could ever store.
        entry.index = uint96(policy_ids.length);
        transaction_count += 1;
    }

    /// Replaces the text of a policy in place (its position does not change). Only the account
    /// that inserted it may: NOT_POLICY_OWNER otherwise; POLICY_NOT_FOUND for an unknown id.
    function updatePolicy(string calldata policy_id, string calldata json) external {
        Entry storage entry = entries[policy_id];
        require(entry.index != 0, POLICY_NOT_FOUND);
        require(entry.owner == msg.sender, NOT_POLICY_OWNER);
        entry.json = json;
        transaction_count += 1;
        emit updated_policy_event(policy_id, json);
    }

    /// Removes a policy: the last one moves into its place, so the order changes (readers must
    /// not take an index as an identity across blocks). Reverts with POLICY_NOT_FOUND for an
    /// unknown id.
    function deletePolicy(string calldata policy_id) external {
        uint256 index = entries[policy_id].index;
        require(index != 0, POLICY_NOT_FOUND);
        uint256 last = policy_ids.length;
        if (index != last) {
            string memory moved = policy_ids[last - 1];
            policy_ids[index - 1] = moved;
            entries[moved].index = uint96(index);
        }
        policy_ids.pop();
        // Clears the text's storage too (part of its cost comes back as a refund).
        delete entries[policy_id];
        transaction_count += 1;
        emit delete_policy_event(true);
    }

    /// The text of the policy at `index` (reverts past the end, as `policy_ids` does).
    function policies(uint256 index) external view returns (string memory) {
        return entries[policy_ids[index]].json;
    }

    /// The text of a policy; reverts with POLICY_NOT_FOUND for an unknown id.
    function getPolicy(string calldata policy_id) external view returns (string memory) {
        Entry storage entry = entries[policy_id];
        require(entry.index != 0, POLICY_NOT_FOUND);
        return entry.json;
    }

    /// The account that inserted a policy; the zero address for an unknown id.
    function getPolicyOwner(string calldata policy_id) external view returns (address) {
        return entries[policy_id].owner;
    }

    /// How many policies there are.
    function num_policies() external view returns (uint256) {
        return policy_ids.length;
    }
}
