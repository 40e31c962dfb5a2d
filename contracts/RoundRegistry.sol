// SPDX-License-Identifier: MIT
pragma solidity 0.8.26;

/// @title RoundRegistry
/// @notice Public record of federated-learning rounds: the base model each round starts from (an
///         IPFS CID), the model update every client published in it, and the model it produced.
///         The owner opens the first round, closes each round to submissions before merging
///         it, and finalizing a round opens the next from the model it produced: from then on
///         exactly one round is current. Each round keeps time and counts: it has a deadline
///         after which it takes no update, a quorum (the fewest updates it may be merged from)
///         and the share of enrolled clients it invites, drawn from a public seed so that any
///         client can check its own invitation and anyone can audit the draw. A round that
///         misses its quorum by its deadline is restarted from the same base.
/// @dev Gas per submission does not depend on the number of clients or rounds: a submission writes
///      two fresh storage slots and updates the round's packed header slot (which also holds its
///      deadline, quorum and invited share), and no transaction loops over clients or submissions.
///
///      CID storage. The system's CIDs are CIDv1, base32, sha2-256 ("bafkrei..." raw leaves,
///      "bafybei..." dag-pb): 59 characters that encode 36 bytes (version 0x01, a one-byte codec,
///      0x12 0x20, a 32-byte digest). Kept as a string such a CID takes three fresh slots (length
///      and two data slots); decoded it takes one slot for the digest, and the codec byte fits
///      beside the client address and sample count. So submitUpdate decodes a CID of that form
///      (about 1,000 gas) and getSubmissions re-encodes it, exactly, since only the canonical form
///      is decoded. Measured: 81,700 gas per submission, against 147,300 for the same CID kept as
///      a string. The floor of any design that keeps the CID, the client and the sample count in
///      storage is two fresh slots (44,200) plus the 21,000 of a transaction. Any other CID (CIDv0
///      "Qm...", other bases or hashes) is accepted and kept as a string, at the higher cost. The
///      full CID is also in the UpdateSubmitted event.
contract RoundRegistry {
    /// @notice A round's header and CIDs.
    /// @dev The first eight fields share one slot: submitUpdate reads and updates only that slot
    ///      (and the round's seed when it invites a share of the clients).
    struct Round {
        uint40 startBlock;
        uint40 finalizeBlock;
        uint40 deadline; // unix seconds; 0 = none
        uint32 submissionCount;
        uint32 quorum;
        uint16 invitedShare; // of the enrolled clients, in basis points
        bool closed; // to submissions: what the organization merges is then fixed
        bool finalized;
        string baseCid; // round 1 only: a later round's base is its predecessor's modelCid
        string modelCid;
    }

    /// @notice A round's record as returned by getRound.
    struct RoundView {
        string baseCid;
        string modelCid;
        bool closed;
        bool finalized;
        uint256 submissionCount;
        uint256 startBlock;
        uint256 finalizeBlock;
        uint256 deadline;
        uint256 quorum;
        uint256 invitedShare;
        bytes32 seed;
    }

    /// @notice The rules every round opened from now on follows.
    struct RoundRules {
        uint40 duration; // seconds from a round's opening to its deadline; 0 = no deadline
        uint32 quorum;
        uint16 invitedShare;
    }

    /// @dev One slot per submission; the CID itself lives in _cidDigest (and _verbatimCid).
    struct SubmissionRecord {
        address client;
        uint64 numSamples;
        // Multicodec of a compact CIDv1 (0x55 raw, 0x70 dag-pb, ...); 0 = CID kept verbatim.
        uint8 cidCodec;
    }

    /// @notice A submission as returned by getSubmissions.
    struct Submission {
        address client;
        string cid;
        uint256 numSamples;
    }

    uint256 private constant CIDV1_BASE32_LENGTH = 59;
    /// @notice The longest CID accepted: every CID in use (CIDv0 is 46 characters, CIDv1 base32
    ///         sha2-256 59) with room to spare, and a bound on what a submission can make others read.
    uint256 public constant MAX_CID_LENGTH = 100;
    /// @notice An invited share of ALL_INVITED basis points invites every enrolled client.
    uint16 public constant ALL_INVITED = 10_000;
    // Bits of the first eight base32 digits: version, codec, multihash code and length (32), then
    // the first digest byte (8). The other 50 digits hold 248 digest bits and 2 zero padding bits.
    uint256 private constant HEAD_DIGITS = 8;

    /// @notice The organization: the only account that manages clients and rounds.
    address public immutable owner;
    /// @notice True when any account may submit; false when only allowlisted clients may.
    bool public immutable openEnrolment;
    /// @notice The largest sample count a submission may report: a bound on any client's FedAvg weight.
    uint64 public immutable maxSamples;
    /// @notice The block the registry was deployed in: where reading its events can start.
    uint256 public immutable deploymentBlock;

    // Rounds 1 to _currentRound - 1 are finalized; _currentRound (if not 0) is open.
    uint256 private _currentRound;
    RoundRules private _rules;
    mapping(uint256 round => Round) private _rounds;
    // The draw that decides which clients a round invites; set only when it invites a share.
    mapping(uint256 round => bytes32) private _seeds;
    // The first round an enrolled client may take part in (the one after the round current at its
    // enrolment, so that who a round expects is fixed when it opens); 0 = not enrolled.
    mapping(address client => uint256) private _enrolledFrom;
    mapping(uint256 round => mapping(uint256 index => SubmissionRecord)) private _submissions;
    // Non-zero exactly when the client has submitted in the round: the sha2-256 digest of a
    // compact CID, or keccak256 of a verbatim one.
    mapping(uint256 round => mapping(address client => bytes32)) private _cidDigest;
    mapping(uint256 round => mapping(address client => string)) private _verbatimCid;

    /// @notice The caller is not the owner.
    error NotOwner(address caller);
    /// @notice The client is not on the allowlist (and enrolment is not open).
    error NotEnrolled(address client);
    /// @notice The client is already on the allowlist.
    error AlreadyEnrolled(address client);
    /// @notice The zero address cannot be a client.
    error ZeroAddress();
    /// @notice The client has already submitted an update in this round.
    error AlreadySubmitted(uint256 round, address client);
    /// @notice The round has not started, or it is closed to submissions.
    error RoundNotOpen(uint256 round);
    /// @notice The round's deadline has passed: it takes no more updates.
    error DeadlinePassed(uint256 round, uint256 deadline);
    /// @notice The round does not invite this client: enrolled after it opened, or not drawn.
    error NotInvited(uint256 round, address client);
    /// @notice The round has fewer submissions than its quorum (and, to be closed, its deadline
    ///         has not passed).
    error QuorumNotMet(uint256 round, uint256 submissionCount, uint256 quorum);
    /// @notice Only a round that missed its quorum by its deadline can be restarted.
    error RoundNotMissed(uint256 round);
    /// @notice A quorum must be at least one update.
    error ZeroQuorum();
    /// @notice An invited share is 1 to ALL_INVITED basis points.
    error InvalidInvitedShare(uint256 invitedShare);
    /// @notice The round must be closed to submissions before it is finalized.
    error RoundNotClosed(uint256 round);
    /// @notice The round is already finalized.
    error RoundAlreadyFinalized(uint256 round);
    /// @notice Rounds have started: the next one opens when this open one is finalized.
    error PreviousRoundOpen(uint256 round);
    /// @notice A CID must not be empty.
    error EmptyCid();
    /// @notice The CID is longer than MAX_CID_LENGTH.
    error CidTooLong(uint256 length, uint256 maxLength);
    /// @notice A submission must report a positive number of samples.
    error ZeroSamples();
    /// @notice The sample count is above maxSamples.
    error TooManySamples(uint256 numSamples, uint256 maxSamples);
    /// @notice maxSamples must be positive.
    error ZeroMaxSamples();

    /// @notice Round `round` started from the model at `baseCid`; it takes updates until `deadline`
    ///         (unix seconds, 0 = none) and is merged from at least `quorum` of them. It invites
    ///         `invitedShare` basis points of the enrolled clients, drawn by `seed` (zero when it
    ///         invites them all): a client learns from the event alone whether it is invited.
    event RoundStarted(uint256 indexed round, string baseCid, uint256 deadline, uint256 quorum,
        uint256 invitedShare, bytes32 seed);
    /// @notice Rounds opened from now on last `duration` seconds, need `quorum` updates and invite
    ///         `invitedShare` basis points of the enrolled clients.
    event RoundRulesSet(uint256 duration, uint256 quorum, uint256 invitedShare);
    /// @notice Round `round` missed its quorum by its deadline, with `submissionCount` updates; the
    ///         next round starts from the same base.
    event RoundMissedQuorum(uint256 indexed round, uint256 submissionCount, uint256 quorum);
    /// @notice `client` published the update at `cid`, trained on `numSamples` samples.
    event UpdateSubmitted(uint256 indexed round, address indexed client, string cid, uint256 numSamples);
    /// @notice Round `round` accepts no more submissions; `submissionCount` of them will be merged.
    event RoundClosed(uint256 indexed round, uint256 submissionCount);
    /// @notice Round `round` produced the model at `modelCid` from `submissionCount` updates.
    event RoundFinalized(uint256 indexed round, string modelCid, uint256 submissionCount);
    /// @notice `client` may submit updates from round `fromRound` on.
    event ClientAdded(address indexed client, uint256 fromRound);
    /// @notice `client` may no longer submit updates.
    event ClientRemoved(address indexed client);

    modifier onlyOwner() {
        if (msg.sender != owner) revert NotOwner(msg.sender);
        _;
    }

    /// @notice Deploys the registry owned by the sender.
    /// @param openEnrolment_ True to let any account submit, false for an owner-managed allowlist.
    /// @param maxSamples_ The largest sample count a submission may report.
    constructor(bool openEnrolment_, uint64 maxSamples_) {
        if (maxSamples_ == 0) revert ZeroMaxSamples();
        owner = msg.sender;
        openEnrolment = openEnrolment_;
        maxSamples = maxSamples_;
        deploymentBlock = block.number;
        _rules = RoundRules({duration: 0, quorum: 1, invitedShare: ALL_INVITED});
    }

    // ---- clients ----------------------------------------------------------------------------

    /// @notice Adds `client` to the allowlist (kept, but not consulted, under open enrolment). It
    ///         takes part from the next round to open: a round expects the clients enrolled before it.
    /// @param client The client's account.
    function addClient(address client) external onlyOwner {
        if (client == address(0)) revert ZeroAddress();
        if (_enrolledFrom[client] != 0) revert AlreadyEnrolled(client);
        uint256 fromRound = _currentRound + 1;
        _enrolledFrom[client] = fromRound;
        emit ClientAdded(client, fromRound);
    }

    /// @notice Removes `client` from the allowlist; its past submissions stay on record.
    /// @param client The client's account.
    function removeClient(address client) external onlyOwner {
        if (_enrolledFrom[client] == 0) revert NotEnrolled(client);
        _enrolledFrom[client] = 0;
        emit ClientRemoved(client);
    }

    /// @notice Whether `client` is on the allowlist.
    /// @param client The account to check.
    /// @return True when the account is on the allowlist.
    function isClient(address client) external view returns (bool) {
        return _enrolledFrom[client] != 0;
    }

    /// @notice The first round `client` may take part in (0 when it is not on the allowlist).
    /// @param client The account to check.
    /// @return The round's number.
    function enrolledFrom(address client) external view returns (uint256) {
        return _enrolledFrom[client];
    }

    /// @notice Whether round `round` invites `client`: enrolled before it opened (or open
    ///         enrolment) and drawn by the round's seed when it invites a share of the clients.
    /// @param round The round's number.
    /// @param client The account to check.
    /// @return True when the client may submit to the round while it is open.
    function isInvited(uint256 round, address client) external view returns (bool) {
        return _rounds[round].startBlock != 0 && _isEnrolledFor(round, client) && _isDrawn(round, client);
    }

    // ---- rules ------------------------------------------------------------------------------

    /// @notice Sets the rules of the rounds opened from now on (the open round keeps its own).
    /// @param duration Seconds from a round's opening to its deadline; 0 for no deadline.
    /// @param quorum The fewest updates a round may be merged from.
    /// @param invitedShare Basis points of the enrolled clients each round invites (ALL_INVITED: all).
    function setRoundRules(uint40 duration, uint32 quorum, uint16 invitedShare) external onlyOwner {
        if (quorum == 0) revert ZeroQuorum();
        if (invitedShare == 0 || invitedShare > ALL_INVITED) revert InvalidInvitedShare(invitedShare);
        _rules = RoundRules({duration: duration, quorum: quorum, invitedShare: invitedShare});
        emit RoundRulesSet(duration, quorum, invitedShare);
    }

    /// @notice The rules of the rounds opened from now on.
    /// @return duration Seconds from a round's opening to its deadline (0: none).
    /// @return quorum The fewest updates a round may be merged from.
    /// @return invitedShare Basis points of the enrolled clients each round invites.
    function roundRules() external view returns (uint256 duration, uint256 quorum, uint256 invitedShare) {
        RoundRules memory rules = _rules;
        return (rules.duration, rules.quorum, rules.invitedShare);
    }

    // ---- rounds -----------------------------------------------------------------------------

    /// @notice Opens the first round, starting from the model at `baseCid`.
    /// @dev Later rounds open as their predecessor is finalized (finalizeRound).
    /// @param baseCid IPFS CID of the base model.
    /// @return round The new round's number, 1.
    function startRound(string calldata baseCid) external onlyOwner returns (uint256 round) {
        _checkCidLength(baseCid);
        if (_currentRound != 0) revert PreviousRoundOpen(_currentRound);
        round = 1;
        _rounds[round].baseCid = baseCid;
        _open(round, baseCid);
    }

    /// @notice Publishes the caller's model update for the open round.
    /// @param round The open round's number.
    /// @param cid IPFS CID of the update.
    /// @param numSamples Number of local samples the update was trained on (its FedAvg weight).
    function submitUpdate(uint256 round, string calldata cid, uint256 numSamples) external {
        _checkCidLength(cid);
        if (numSamples == 0) revert ZeroSamples();
        if (numSamples > maxSamples) revert TooManySamples(numSamples, maxSamples);
        if (!openEnrolment && _enrolledFrom[msg.sender] == 0) revert NotEnrolled(msg.sender);
        // A started round not yet closed is necessarily the current one: no other can be open.
        Round storage r = _rounds[round];
        if (r.startBlock == 0 || r.closed) revert RoundNotOpen(round);
        if (r.deadline != 0 && block.timestamp > r.deadline) revert DeadlinePassed(round, r.deadline);
        if (!_isEnrolledFor(round, msg.sender) || (r.invitedShare < ALL_INVITED && !_isDrawn(round, msg.sender))) {
            revert NotInvited(round, msg.sender);
        }
        if (_cidDigest[round][msg.sender] != 0) revert AlreadySubmitted(round, msg.sender);

        (uint8 codec, bytes32 digest) = _decodeCid(cid);
        // An all-zero digest would read as "not submitted yet": keep such a CID verbatim instead.
        if (codec == 0 || digest == 0) {
            codec = 0;
            digest = keccak256(bytes(cid));
            _verbatimCid[round][msg.sender] = cid;
        }
        _cidDigest[round][msg.sender] = digest;
        uint32 index = r.submissionCount;
        r.submissionCount = index + 1;
        _submissions[round][index] =
            SubmissionRecord({client: msg.sender, numSamples: uint64(numSamples), cidCodec: codec});
        emit UpdateSubmitted(round, msg.sender, cid, numSamples);
    }

    /// @notice Closes the open round to submissions, so that the set the organization merges is
    ///         fixed: every submission counted on chain is one it reads. Allowed once the round has
    ///         its quorum, or once its deadline has passed.
    /// @param round The open round's number.
    function closeRound(uint256 round) external onlyOwner {
        Round storage r = _rounds[round];
        if (r.startBlock == 0 || r.closed) revert RoundNotOpen(round);
        if (r.submissionCount < r.quorum && !_isPastDeadline(r)) {
            revert QuorumNotMet(round, r.submissionCount, r.quorum);
        }
        r.closed = true;
        emit RoundClosed(round, r.submissionCount);
    }

    /// @notice Ends a round that missed its quorum by its deadline, and opens the next round from
    ///         the same base, under the current rules: no round is ever stuck.
    /// @param round The current round's number.
    function restartRound(uint256 round) external onlyOwner {
        Round storage r = _rounds[round];
        if (r.finalized) revert RoundAlreadyFinalized(round);
        if (r.startBlock == 0) revert RoundNotOpen(round);
        if (r.submissionCount >= r.quorum || !_isPastDeadline(r)) revert RoundNotMissed(round);
        string memory baseCid = _baseCidOf(round);
        r.closed = true;
        r.finalized = true;
        r.finalizeBlock = uint40(block.number);
        r.modelCid = baseCid; // what the next round starts from: its base is this round's model
        emit RoundMissedQuorum(round, r.submissionCount, r.quorum);
        _open(round + 1, baseCid);
    }

    /// @notice Finalizes the closed round with the model it produced and opens the next round
    ///         from that model, in one transaction.
    /// @param round The closed round's number.
    /// @param modelCid IPFS CID of the merged model, the next round's base.
    function finalizeRound(uint256 round, string calldata modelCid) external onlyOwner {
        _checkCidLength(modelCid);
        Round storage r = _rounds[round];
        if (r.finalized) revert RoundAlreadyFinalized(round);
        if (r.startBlock == 0) revert RoundNotOpen(round);
        if (!r.closed) revert RoundNotClosed(round);
        if (r.submissionCount < r.quorum) revert QuorumNotMet(round, r.submissionCount, r.quorum);
        // A closed, unfinalized round is necessarily the current one, so the next is round + 1.
        r.finalized = true;
        r.finalizeBlock = uint40(block.number);
        r.modelCid = modelCid;
        emit RoundFinalized(round, modelCid, r.submissionCount);
        _open(round + 1, modelCid); // its base is r.modelCid (_baseCidOf)
    }

    /// @notice The number of the latest round started (0 before the first).
    /// @return The current round's number.
    function currentRound() external view returns (uint256) {
        return _currentRound;
    }

    /// @notice A round's record; all zero for a round that has not started. Its model is its base
    ///         when it missed its quorum (RoundMissedQuorum).
    /// @param round The round's number.
    /// @return record The base and model CIDs ("" until finalized), whether it is closed and
    ///         finalized, its submission count, the blocks it started and was finalized in (0
    ///         until then), its deadline (unix seconds, 0 = none), quorum, invited share (basis
    ///         points) and the seed of its draw (0 when it invites every enrolled client).
    function getRound(uint256 round) external view returns (RoundView memory record) {
        Round storage r = _rounds[round];
        return RoundView({
            baseCid: _baseCidOf(round),
            modelCid: r.modelCid,
            closed: r.closed,
            finalized: r.finalized,
            submissionCount: r.submissionCount,
            startBlock: r.startBlock,
            finalizeBlock: r.finalizeBlock,
            deadline: r.deadline,
            quorum: r.quorum,
            invitedShare: r.invitedShare,
            seed: _seeds[round]
        });
    }

    /// @notice The current round as `client` sees it, in one call: what a device reads before it trains.
    /// @param client The client's account.
    /// @return round The current round's number (0 before the first round).
    /// @return baseCid CID of the model it starts from ("" before the first round).
    /// @return open Whether it still accepts submissions: started, not closed, deadline not passed.
    /// @return submitted Whether `client` has submitted an update to it.
    /// @return invited Whether it invites `client`.
    /// @return deadline Its deadline in unix seconds (0 = none).
    function currentRoundFor(address client)
        external
        view
        returns (uint256 round, string memory baseCid, bool open, bool submitted, bool invited, uint256 deadline)
    {
        round = _currentRound;
        Round storage r = _rounds[round];
        open = round != 0 && !r.closed && !_isPastDeadline(r);
        invited = round != 0 && _isEnrolledFor(round, client) && _isDrawn(round, client);
        return (round, _baseCidOf(round), open, _cidDigest[round][client] != 0, invited, r.deadline);
    }

    /// @notice The model of the latest finalized round.
    /// @return round Its number (0 when no round is finalized yet).
    /// @return modelCid Its model's CID ("" when none).
    function latestModel() external view returns (uint256 round, string memory modelCid) {
        round = _currentRound > 1 ? _currentRound - 1 : 0;
        modelCid = _rounds[round].modelCid;
    }

    // ---- submissions ------------------------------------------------------------------------

    /// @notice A page of a round's submissions, in the order they were made.
    /// @param round The round's number.
    /// @param offset Index of the first submission to return.
    /// @param limit Maximum number of submissions to return.
    /// @return page The submissions from `offset`, at most `limit` of them.
    function getSubmissions(uint256 round, uint256 offset, uint256 limit)
        external
        view
        returns (Submission[] memory page)
    {
        uint256 count = _rounds[round].submissionCount;
        if (offset >= count) return new Submission[](0);
        uint256 end = count - offset > limit ? offset + limit : count;
        page = new Submission[](end - offset);
        for (uint256 i = offset; i < end; ++i) {
            SubmissionRecord storage s = _submissions[round][i];
            page[i - offset] = Submission({client: s.client, cid: _cidOf(round, s), numSamples: s.numSamples});
        }
    }

    /// @notice Whether `client` has submitted an update in `round`.
    /// @param round The round's number.
    /// @param client The client's account.
    /// @return True when it has.
    function hasSubmitted(uint256 round, address client) external view returns (bool) {
        return _cidDigest[round][client] != 0;
    }

    // ---- rounds' rules ----------------------------------------------------------------------

    /// @dev Makes round `round` the current one and opens it under the current rules.
    function _open(uint256 round, string memory baseCid) private {
        RoundRules memory rules = _rules;
        _currentRound = round;
        Round storage r = _rounds[round];
        r.startBlock = uint40(block.number);
        r.deadline = rules.duration == 0 ? 0 : uint40(block.timestamp) + rules.duration;
        r.quorum = rules.quorum;
        r.invitedShare = rules.invitedShare;
        // The draw's seed: the previous block's hash, unknown until that block was mined.
        bytes32 seed;
        if (rules.invitedShare < ALL_INVITED) {
            seed = blockhash(block.number - 1);
            _seeds[round] = seed;
        }
        emit RoundStarted(round, baseCid, r.deadline, rules.quorum, rules.invitedShare, seed);
    }

    function _isPastDeadline(Round storage r) private view returns (bool) {
        return r.deadline != 0 && block.timestamp > r.deadline;
    }

    function _isEnrolledFor(uint256 round, address client) private view returns (bool) {
        if (openEnrolment) return true;
        uint256 fromRound = _enrolledFrom[client];
        return fromRound != 0 && fromRound <= round;
    }

    /// @dev The draw: a client is invited when keccak256(seed, client) mod ALL_INVITED falls below
    ///      the round's share, so each enrolled client is drawn independently with that probability.
    function _isDrawn(uint256 round, address client) private view returns (bool) {
        uint16 share = _rounds[round].invitedShare;
        if (share >= ALL_INVITED) return true;
        return uint256(keccak256(abi.encode(_seeds[round], client))) % ALL_INVITED < share;
    }

    // ---- CIDs -------------------------------------------------------------------------------

    function _checkCidLength(string calldata cid) private pure {
        uint256 length = bytes(cid).length;
        if (length == 0) revert EmptyCid();
        if (length > MAX_CID_LENGTH) revert CidTooLong(length, MAX_CID_LENGTH);
    }

    /// @dev Round 1 keeps its base; every later round starts from its predecessor's model (and a
    ///      round that has not started has neither).
    function _baseCidOf(uint256 round) private view returns (string memory) {
        return round <= 1 ? _rounds[round].baseCid : _rounds[round - 1].modelCid;
    }

    function _cidOf(uint256 round, SubmissionRecord storage s) private view returns (string memory) {
        if (s.cidCodec == 0) return _verbatimCid[round][s.client];
        return _encodeCid(s.cidCodec, _cidDigest[round][s.client]);
    }

    /// @dev Decodes a canonical CIDv1 base32 sha2-256 string with a one-byte codec; returns codec 0
    ///      for anything else, which the caller then stores verbatim. The 59 characters are read as
    ///      two words and decoded 32 at a time (_base32Word), about 1,000 gas instead of the 11,000
    ///      of a loop over the characters.
    function _decodeCid(string calldata cid) private pure returns (uint8 codec, bytes32 digest) {
        bytes calldata text = bytes(cid);
        if (text.length != CIDV1_BASE32_LENGTH || text[0] != "b") return (0, 0);
        // Characters 0-31, then 32-58 followed by five "a" (digit value 0) to fill the word.
        (uint256 first, bool firstValid) = _base32Word(uint256(bytes32(text[0:32])));
        (uint256 second, bool secondValid) = _base32Word(uint256(bytes32(text[32:])) | 0x6161616161);
        // first: the 5 bits of "b", then 155 payload bits; second: 135 payload bits, 25 zero bits.
        // Payload (290 bits): 0x01 <codec> 0x12 0x20, the 256-bit digest, 2 zero padding bits.
        uint256 prefix = (first >> 123) & 0xffffffff;
        codec = uint8(prefix >> 16);
        bool canonical = firstValid && secondValid && prefix & 0xff00ffff == 0x01001220 && codec != 0
            && codec < 0x80 && (second >> 25) & 3 == 0;
        if (!canonical) return (0, 0);
        digest = bytes32(((first & ((1 << 123) - 1)) << 133) | (second >> 27));
    }

    /// @dev Decodes 32 base32 digits (RFC 4648 lower case, first digit in the highest byte) into
    ///      160 bits, all bytes at once: each byte becomes its 5-bit value, then neighbouring
    ///      values are joined pairwise in lanes of 16, 32, 64, 128 and 256 bits. `valid` is false
    ///      when any byte is not a digit; `bits` is meaningless then.
    function _base32Word(uint256 word) private pure returns (uint256 bits, bool valid) {
        uint256 highBits = 0x8080808080808080808080808080808080808080808080808080808080808080;
        unchecked {
            // Per byte c < 0x80 (no carry leaves a byte): bit 7 of c + k is set when c >= 0x80 - k.
            uint256 atLeast32 = (word + 0x4e4e4e4e4e4e4e4e4e4e4e4e4e4e4e4e4e4e4e4e4e4e4e4e4e4e4e4e4e4e4e4e) & highBits; // c >= "2"
            uint256 atLeast38 = (word + 0x4848484848484848484848484848484848484848484848484848484848484848) & highBits; // c >= "8"
            uint256 atLeast61 = (word + 0x1f1f1f1f1f1f1f1f1f1f1f1f1f1f1f1f1f1f1f1f1f1f1f1f1f1f1f1f1f1f1f1f) & highBits; // c >= "a"
            uint256 atMost7a = ~(word + 0x0505050505050505050505050505050505050505050505050505050505050505) & highBits; // c <= "z"
            valid = word & highBits == 0
                && atLeast32 & atMost7a & (atLeast61 | (~atLeast38 & highBits)) == highBits;
            // "a"-"z" -> 0-25 (c - 0x61), "2"-"7" -> 26-31 (c - 0x18); no borrow for digits.
            uint256 values = word - 0x1818181818181818181818181818181818181818181818181818181818181818 - (atLeast61 >> 7) * 0x49;
            values = ((values & 0xff00ff00ff00ff00ff00ff00ff00ff00ff00ff00ff00ff00ff00ff00ff00ff00) >> 3) | (values & 0x00ff00ff00ff00ff00ff00ff00ff00ff00ff00ff00ff00ff00ff00ff00ff00ff);
            values = ((values & 0xffff0000ffff0000ffff0000ffff0000ffff0000ffff0000ffff0000ffff0000) >> 6) | (values & 0x0000ffff0000ffff0000ffff0000ffff0000ffff0000ffff0000ffff0000ffff);
            values = ((values & 0xffffffff00000000ffffffff00000000ffffffff00000000ffffffff00000000) >> 12) | (values & 0x00000000ffffffff00000000ffffffff00000000ffffffff00000000ffffffff);
            values = ((values & 0xffffffffffffffff0000000000000000ffffffffffffffff0000000000000000) >> 24)
                | (values & 0x0000000000000000ffffffffffffffff0000000000000000ffffffffffffffff);
            bits = ((values >> 128) << 80) | (values & type(uint128).max);
        }
    }

    function _encodeCid(uint8 codec, bytes32 digest) private pure returns (string memory) {
        bytes memory alphabet = "abcdefghijklmnopqrstuvwxyz234567";
        bytes memory text = new bytes(CIDV1_BASE32_LENGTH);
        text[0] = "b";
        uint256 head = (uint256(0x01001220 | (uint256(codec) << 16)) << 8) | (uint256(digest) >> 248);
        uint256 tail = (uint256(digest) & ((1 << 248) - 1)) << 2;
        for (uint256 i = HEAD_DIGITS; i > 0; --i) {
            text[i] = alphabet[head & 31];
            head >>= 5;
        }
        for (uint256 i = CIDV1_BASE32_LENGTH - 1; i > HEAD_DIGITS; --i) {
            text[i] = alphabet[tail & 31];
            tail >>= 5;
        }
        return string(text);
    }
}
