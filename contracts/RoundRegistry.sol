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
///      one fresh storage slot (the mark that the client has submitted in the round, which is what
///      enforces one update per client per round) and updates the round's packed header slot
///      (which also holds its deadline, quorum and invited share, read by the same call), and no
///      transaction loops over clients or submissions.
///
///      Submissions on record. The update's CID and sample count are in the UpdateSubmitted event
///      only, exactly as the client sent them: receipts are part of the chain's consensus data, so
///      anyone reads a round's submissions from its events (filtered by the indexed round), in
///      submission order, and `getRound(round).submissionCount` says how many there are. Keeping
///      the CID in storage as well cost 82,600 gas per submission (two fresh slots, the CID decoded
///      to its digest) or 147,300 (kept as a string); the floor of this design is one fresh slot
///      (22,100) and the round's header (5,000) plus the 21,000 of a transaction.
///
///      Secure aggregation. A round whose plan asks for it also carries the messages of its
///      stages (postRoundMessage): the clients' signed ephemeral keys, the CIDs of their encrypted
///      secret shares and of their revealed shares, the survivors' unmasking keys, and the
///      organization's rosters. The contract stores none of them; it checks who may post which
///      kind when, and logs each in one event.
contract RoundRegistry {
    /// @notice The messages of a secure-aggregation round, in the order its stages use them.
    /// @dev Keys, Shares, Unmask and Reveal come from the round's invited clients, the rosters
    ///      from the owner. Keys, Shares and the key and mask rosters only while the round is open;
    ///      the unmask and recovery rosters, Unmask and Reveal only once it is closed and until it
    ///      is finalized (which clients dropped out is then fixed: those on the mask roster that
    ///      the unmask roster leaves out). New kinds are added at the end: the values are on record.
    enum MessageKind {
        Keys, // a client's public keys and self-mask seed commitment, signed (and its Shares' CID)
        Shares, // CID of a client's Shamir shares of its mask secret and seed, each encrypted to one peer
        KeyRoster, // the clients whose keys the round uses (packed 20-byte addresses)
        MaskRoster, // the clients whose shares arrived: they mask against each other and train
        Reveal, // CID of a client's decrypted shares of the secrets the recovery roster names
        UnmaskRoster, // the survivors: the clients whose masked updates enter the sums
        Unmask, // a survivor's self-mask seed and its pairwise keys with its group's dropped clients
        RecoveryRoster // the clients whose secrets are still missing: their shares are revealed
    }

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

    /// @notice The longest CID accepted: every CID in use (CIDv0 is 46 characters, CIDv1 base32
    ///         sha2-256 59) with room to spare, and a bound on what a submission can make others read.
    uint256 public constant MAX_CID_LENGTH = 100;
    /// @notice An invited share of ALL_INVITED basis points invites every enrolled client.
    uint16 public constant ALL_INVITED = 10_000;
    /// @notice The longest round message: a roster of 200 clients, or keys with their signature.
    uint256 public constant MAX_MESSAGE_LENGTH = 4_000;

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
    // True exactly when the client has submitted in the round: one fresh slot per submission. The
    // CID and the sample count are in the UpdateSubmitted event.
    mapping(uint256 round => mapping(address client => bool)) private _submitted;

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
    /// @notice A round message must not be empty.
    error EmptyMessage();
    /// @notice The round message is longer than MAX_MESSAGE_LENGTH.
    error MessageTooLong(uint256 length, uint256 maxLength);
    /// @notice This kind of round message cannot be posted in the round's present state.
    error WrongStage(uint256 round, MessageKind kind);

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
    /// @notice `client` published the update at `cid`, trained on `numSamples` samples: the record
    ///         of a submission (the contract stores only that `client` submitted in `round`).
    event UpdateSubmitted(uint256 indexed round, address indexed client, string cid, uint256 numSamples);
    /// @notice Round `round` accepts no more submissions; `submissionCount` of them will be merged.
    event RoundClosed(uint256 indexed round, uint256 submissionCount);
    /// @notice Round `round` produced the model at `modelCid` from `submissionCount` updates.
    event RoundFinalized(uint256 indexed round, string modelCid, uint256 submissionCount);
    /// @notice `sender` posted a message of `kind` for round `round`: a stage of secure aggregation.
    event RoundMessage(uint256 indexed round, address indexed sender, MessageKind kind, bytes payload);
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

    /// @notice Publishes the caller's model update for the open round. The chain keeps that the
    ///         caller submitted (hasSubmitted) and counts it in the round; the CID and the sample
    ///         count are on record in the UpdateSubmitted event, for anyone to read.
    /// @param round The open round's number.
    /// @param cid IPFS CID of the update.
    /// @param numSamples Number of local samples the update was trained on (its FedAvg weight).
    function submitUpdate(uint256 round, string calldata cid, uint256 numSamples) external {
        _checkCidLength(cid);
        if (numSamples == 0) revert ZeroSamples();
        if (numSamples > maxSamples) revert TooManySamples(numSamples, maxSamples);
        // One read of the caller's enrolment serves both checks (_isEnrolledFor's rule).
        bool enrolledInTime = true;
        if (!openEnrolment) {
            uint256 fromRound = _enrolledFrom[msg.sender];
            if (fromRound == 0) revert NotEnrolled(msg.sender);
            enrolledInTime = fromRound <= round;
        }
        // A started round not yet closed is necessarily the current one: no other can be open.
        Round storage r = _rounds[round];
        if (r.startBlock == 0 || r.closed) revert RoundNotOpen(round);
        if (r.deadline != 0 && block.timestamp > r.deadline) revert DeadlinePassed(round, r.deadline);
        if (!enrolledInTime || (r.invitedShare < ALL_INVITED && !_isDrawn(round, msg.sender))) {
            revert NotInvited(round, msg.sender);
        }
        mapping(address client => bool) storage submitted = _submitted[round];
        if (submitted[msg.sender]) revert AlreadySubmitted(round, msg.sender);

        submitted[msg.sender] = true;
        ++r.submissionCount;
        emit UpdateSubmitted(round, msg.sender, cid, numSamples);
    }

    /// @notice Posts a message of a secure-aggregation stage of round `round` (see MessageKind for
    ///         who posts which kind, and when). The contract checks the sender and the stage and
    ///         logs the message in a RoundMessage event; readers check its content.
    /// @param round The round's number.
    /// @param kind What the message is.
    /// @param payload Its content: keys and signature, a CID, or packed 20-byte addresses.
    function postRoundMessage(uint256 round, MessageKind kind, bytes calldata payload) external {
        if (payload.length == 0) revert EmptyMessage();
        if (payload.length > MAX_MESSAGE_LENGTH) revert MessageTooLong(payload.length, MAX_MESSAGE_LENGTH);
        Round storage r = _rounds[round];
        if (r.startBlock == 0 || r.finalized) revert RoundNotOpen(round);
        if (_isRoster(kind)) {
            if (msg.sender != owner) revert NotOwner(msg.sender);
        } else if (!_isEnrolledFor(round, msg.sender) || !_isDrawn(round, msg.sender)) {
            revert NotInvited(round, msg.sender);
        }
        if (_isAfterClosing(kind) ? !r.closed : (r.closed || _isPastDeadline(r))) revert WrongStage(round, kind);
        emit RoundMessage(round, msg.sender, kind, payload);
    }

    /// @dev The kinds only the owner posts.
    function _isRoster(MessageKind kind) private pure returns (bool) {
        return kind == MessageKind.KeyRoster || kind == MessageKind.MaskRoster || kind == MessageKind.UnmaskRoster
            || kind == MessageKind.RecoveryRoster;
    }

    /// @dev The kinds of the unmasking stages: posted between a round's closing and its finalizing.
    function _isAfterClosing(MessageKind kind) private pure returns (bool) {
        return kind == MessageKind.Reveal || kind == MessageKind.UnmaskRoster || kind == MessageKind.Unmask
            || kind == MessageKind.RecoveryRoster;
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
        return (round, _baseCidOf(round), open, _submitted[round][client], invited, r.deadline);
    }

    /// @notice The model of the latest finalized round.
    /// @return round Its number (0 when no round is finalized yet).
    /// @return modelCid Its model's CID ("" when none).
    function latestModel() external view returns (uint256 round, string memory modelCid) {
        round = _currentRound > 1 ? _currentRound - 1 : 0;
        modelCid = _rounds[round].modelCid;
    }

    // ---- submissions ------------------------------------------------------------------------

    /// @notice Whether `client` has submitted an update in `round`.
    /// @param round The round's number.
    /// @param client The client's account.
    /// @return True when it has.
    function hasSubmitted(uint256 round, address client) external view returns (bool) {
        return _submitted[round][client];
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
}
