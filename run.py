#!/usr/bin/env python
"""Entry point of every process: app, client, clients, deploy, chain, ipfs and demo. See README.md."""
from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import sys
import tempfile
import time
import traceback
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# eth-hash picks pycryptodome's keccak first; safe-pysha3's is 7x faster, and every address web3
# checksums (each log, receipt and call) is one: a tenth of a secure round's CPU at 20 devices
os.environ.setdefault("ETH_HASH_BACKEND", "pysha3")

# What the command line checks its choices against: none of these loads TensorFlow.
from infra.settings import CHAIN_NODE_KINDS, Settings  # noqa: E402
from processor.aggregate import AGGREGATIONS  # noqa: E402
from processor.partition import SCHEMES  # noqa: E402
from processor.privacy import PrivacyPlan  # noqa: E402
from processor.tasks import TASKS  # noqa: E402
from processor.training import TrainingSettings  # noqa: E402

TASK_PLANS = {name: task.plan for name, task in TASKS.items()}  # how each task's clients train by default
# `run.py demo --private`: client-level DP and secure aggregation on the demo's own rounds
# (benchmarks/README.md, "Privacy", says how it was chosen and what it costs).
PRIVATE_DEMO = PrivacyPlan(clip_norm=1.0, noise_multiplier=0.05, secure_aggregation=True, threshold=2)

# The flags that say where the services are, and the commands that use each.
SERVICE_FLAGS = {
    "chain_url": ("--chain-url", str, "JSON-RPC URL of the chain, or 'embedded' (env FL_CHAIN_URL)"),
    "ipfs_api": ("--ipfs-api", str, "IPFS HTTP API URL, or 'embedded' (env FL_IPFS_API)"),
    "state_dir": ("--state-dir", Path, "logs, chain data, IPFS repo (env FL_STATE_DIR)"),
    "contract_record": ("--contract-record", Path, "deployment record (env FL_CONTRACT_RECORD)"),
    "chain_node": ("--node", str, "the chain node to start where none answers: Ganache, or Foundry's anvil "
                                  "(env FL_CHAIN_NODE; default ganache)", CHAIN_NODE_KINDS),
}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Each flag's default after its help (where it has one), and the examples as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        shown = not any(action.default is value for value in (None, False, argparse.SUPPRESS))  # 0 is shown
        if action.option_strings and "%(default)" not in text and shown:
            text += " (default: %(default)s)"
        return text


def settings_from(args: argparse.Namespace) -> Settings:
    return Settings.from_env(**{name: getattr(args, name, None) for name in SERVICE_FLAGS})


def app_settings(args: argparse.Namespace) -> Settings:
    """An app's settings: its bind address is one of the Host names it answers."""
    settings = settings_from(args)
    if args.host in settings.allowed_hosts or args.host in ("0.0.0.0", "::"):
        return settings
    return replace(settings, allowed_hosts=(*settings.allowed_hosts, args.host))


# What TensorFlow's native libraries write as they load, through absl's logging before anything set
# it up, where TF_CPP_MIN_LOG_LEVEL does not reach: absl's notice of that, and INFO lines ("oneDNN
# custom operations are on", once per library).
TENSORFLOW_NOTES = re.compile(r"WARNING: All log messages before absl::InitializeLog\(\) is called"
                              r"|I\d{4} \d\d:\d\d:\d+\.\d+ +\d+ [\w.]+:\d+\] ")
TENSORFLOW_COMMANDS = ("app", "client", "clients", "demo", "task")


def load_tensorflow_quietly() -> None:
    """Import TensorFlow with its start-up notes held back. They are written to file descriptor 2
    by native code, so it is pointed at a file meanwhile; whatever else lands there (a warning,
    an error) is passed on."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            import tensorflow  # noqa: F401
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            for line in held.read().decode(errors="replace").splitlines(keepends=True):
                if not TENSORFLOW_NOTES.match(line):
                    sys.stderr.write(line)


def configure_logging(verbose: bool) -> None:
    """Log lines on stderr: WARNING and up, and INFO too with --verbose."""
    from infra.webapp import LOG_FORMAT

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format=LOG_FORMAT)


def interrupt_on_sigterm(signum, frame) -> None:
    """SIGTERM unwinds like Ctrl-C, so every context manager stops the services it started."""
    raise KeyboardInterrupt


def wait_forever(what: str) -> None:
    print(f"{what}; Ctrl-C stops it.", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass


def task_reference(text: str) -> str:
    """A --task: a built-in task's name, a task spec file, or the CID a spec was published under."""
    from processor.spec_task import is_spec_file

    if text in TASKS or is_spec_file(text):
        return text
    from infra.ipfs import StorageError, parse_cid

    try:
        parse_cid(text)
    except StorageError:
        raise argparse.ArgumentTypeError(f"{text!r} is none of the tasks {', '.join(TASKS)}, nor a task spec "
                                         "file (*.json), nor a CID") from None
    return text


def plan_from(args: argparse.Namespace) -> TrainingSettings:
    """The round plan: the flags given, the task's own plan for the rest."""
    if args.task in TASKS:
        return TrainingSettings.from_args(args, base=TASKS[args.task].plan)
    from processor.spec_task import read_task_file

    return TrainingSettings.from_args(args, base=read_task_file(args.task).plan)


def cmd_app(args: argparse.Namespace) -> None:
    from infra import chain
    from infra.webapp import serve
    from organization import create_app
    from organization.service import OrganizationConfig
    from processor.screen import policy_for
    from processor.task_spec import SpecError

    try:
        training = plan_from(args)
    except SpecError as exc:
        sys.exit(f"run.py app: the task spec {args.task}: {exc}")
    config = OrganizationConfig(task=args.task, held_out=args.test_data, seed=args.seed,
                                pretrain_epochs=args.pretrain_epochs, training=training,
                                merge=policy_for(args.bounds, aggregation=args.aggregation, clip_norm=args.clip_norm),
                                privacy=args.privacy,
                                open_enrolment=args.open_enrolment,
                                max_samples=args.max_samples or chain.DEFAULT_MAX_SAMPLES,
                                rules=round_rules_from(args), rounds=args.rounds,
                                target_accuracy=args.target_accuracy, stage_seconds=args.stage_seconds)
    try:
        app = create_app({"SETTINGS": app_settings(args), "ORG_CONFIG": config})
    except ValueError as exc:  # a held-out file that does not fit the spec, or none given: said in one line
        sys.exit(f"run.py app: {exc}")
    serve(app, args.host, args.port, debug=args.debug)


def secure_aggregation_allowed(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse what secure rounds cannot do: the organization must post their rosters as they run
    (rounds run by themselves, on an allowlist), and a round merged from fewer updates than the
    threshold could not be unmasked."""
    threshold = args.privacy.threshold
    if getattr(args, "drive", False) or getattr(args, "embedded", False):
        parser.error("secure aggregation runs on the self-running network: leave out --drive and --embedded")
    if args.command == "app" and args.rounds == 0:
        parser.error("secure aggregation needs the organization to run the rounds by itself (it posts each "
                     "round's rosters as the stages end): give --rounds")
    if getattr(args, "open_enrolment", False):
        parser.error("secure aggregation needs the allowlist (its rosters name the expected clients): "
                     "leave out --open-enrolment")
    if hasattr(args, "clients") and args.clients < threshold:
        parser.error(f"--clients {args.clients} is fewer than the secure aggregation threshold {threshold}")
    if hasattr(args, "quorum") and args.quorum < threshold:
        parser.error(f"--quorum {args.quorum} is below the secure aggregation threshold {threshold}: a round "
                     "merged from fewer updates could not be unmasked")


def round_rules_from(args: argparse.Namespace):
    from infra import chain

    return chain.RoundRules(duration=args.round_seconds, quorum=args.quorum,
                            invited_share=round(args.invite * chain.ALL_INVITED / 100))


def partition_of(args: argparse.Namespace) -> str:
    """The --partition asked for, else the task's own (by-user for interest)."""
    return args.partition or (TASKS[args.task].default_partition if args.task in TASKS else "iid")


def cmd_client(args: argparse.Namespace) -> None:
    from client import create_app
    from client.service import ClientConfig, WrongNetwork
    from infra import chain
    from infra.ipfs import StorageError
    from infra.webapp import serve
    from processor.device_data import DeviceDataError
    from processor.task_spec import SpecError

    key = args.key or (chain.DEV_KEYS[args.account] if args.account is not None else None)
    config = ClientConfig(client_id=args.id, num_clients=args.clients, task=args.task, partition=partition_of(args),
                          alpha=args.alpha, seed=args.seed, data_path=args.data, key=key, agent=not args.manual,
                          train_delay=args.train_delay)
    try:
        app = create_app({"SETTINGS": app_settings(args), "CLIENT_CONFIG": config})
    except (DeviceDataError, WrongNetwork, SpecError, StorageError) as exc:  # before the first round, in one line
        sys.exit(f"client {args.id}: {exc}")
    serve(app, args.host, args.port if args.port else 5100 + args.id, debug=args.debug)


def cmd_clients(args: argparse.Namespace) -> None:
    from client.group import GroupConfig, create_app
    from client.service import ClientConfig, WrongNetwork
    from infra.ipfs import StorageError
    from infra.webapp import serve
    from processor.device_data import DeviceDataError

    first = ClientConfig(client_id=args.first_id, num_clients=args.clients or args.first_id + args.count,
                         task=args.task, partition=partition_of(args), alpha=args.alpha, seed=args.seed, agent=True,
                         data_path=args.data, train_delay=args.train_delay)
    devices = f"clients {args.first_id}-{args.first_id + args.count - 1}"
    try:
        app = create_app({"SETTINGS": app_settings(args), "GROUP_CONFIG": GroupConfig(first, args.count)})
    except (DeviceDataError, WrongNetwork, ValueError, StorageError) as exc:  # a wrong count, split or task
        sys.exit(f"{devices}: {exc}")
    unfunded = app.extensions["group"].unfunded()
    if unfunded:
        print(f"{devices}: {len(unfunded)} of the accounts cannot pay for a submission: fund them with "
              f"`python run.py enrol --clients-of {args.count} --first-id {args.first_id}`", file=sys.stderr)
    serve(app, args.host, args.port, debug=args.debug)


def cmd_deploy(args: argparse.Namespace) -> None:
    from infra import chain

    settings = settings_from(args)
    w3 = chain.connect(settings.chain_url)
    registry = chain.deploy_registry(w3, settings.org_key or chain.DEV_KEYS[0], open_enrolment=args.open_enrolment,
                                     max_samples=args.max_samples or chain.DEFAULT_MAX_SAMPLES)
    chain.record_deployment(settings.contract_record, w3, registry.address)
    print(f"deployed the round registry at {registry.address}; recorded in {settings.contract_record}")


def cmd_enrol(args: argparse.Namespace) -> None:
    from infra import chain

    if bool(args.addresses) == bool(args.clients_of):
        sys.exit("run.py enrol: name the addresses to enrol, or --clients-of N (not both)")
    settings = settings_from(args)
    w3 = chain.connect(settings.chain_url)
    address = chain.find_deployment(w3, settings.contract_record)
    if address is None:
        sys.exit(f"no round registry is recorded for this chain in {settings.contract_record}: deploy one first")
    registry = chain.Registry(w3, address)
    org_key = settings.org_key or chain.DEV_KEYS[0]
    if args.clients_of:
        addresses = [chain.client_address(k) for k in range(args.first_id, args.first_id + args.clients_of)]
        funded = chain.fund_accounts(w3, org_key, addresses)
        print(f"funded {len(funded)} of the {len(addresses)} accounts from the organization's")
    else:
        addresses = args.addresses
    for client in addresses:
        if not w3.is_address(client):
            sys.exit(f"'{client}' is not an Ethereum address")
        if registry.is_client(client):
            print(f"{client} is already enrolled")
            continue
        registry.add_client(org_key, client)
        print(f"enrolled {client}: it takes part from round {registry.enrolled_from(client)}")


def cmd_task(args: argparse.Namespace) -> None:
    """Draft a task spec from a data file, or check a spec and data files against it."""
    import json

    from processor import task_spec
    from processor.device_data import DeviceDataError, read_spec_data

    try:
        if args.action == "init":
            if not args.label:
                sys.exit("run.py task init: name the column to predict with --label")
            document = task_spec.draft_spec(args.files[0], args.label, args.name)
            spec = task_spec.read_spec(json.dumps(document))
            text = json.dumps(document, indent=1)
            if args.output:
                args.output.write_text(text + "\n")
            else:
                print(text)
        else:
            spec = task_spec.read_spec(Path(args.files[0]).read_bytes())
        kinds = ", ".join(f"{column.name} ({column.kind})" for column in spec.features)
        print(f"task {spec.name!r}: {spec.label.kind} label {spec.label.name!r} from {kinds}; "
              f"{spec.checked.parameters:,} parameters (limit {spec.limits.parameters:,})",
              file=sys.stderr if args.action == "init" and not args.output else sys.stdout)
        for path in args.files[1:] if args.action == "check" else ():
            _, labels = read_spec_data(spec, path)
            print(f"{path}: {len(labels)} rows fit the spec")
    except (task_spec.SpecError, DeviceDataError) as exc:
        sys.exit(f"run.py task {args.action}: {exc}")
    except OSError as exc:
        sys.exit(f"run.py task {args.action}: {exc.filename}: {exc.strerror}")


def published_model(args: argparse.Namespace):
    """The model `args.model` names, of `args.task` (exits with one line when it cannot be had)."""
    from infra import chain, models
    from infra.ipfs import StorageError
    from processor.task_spec import SpecError

    try:
        return models.fetch_model(settings_from(args), args.task, args.model)
    except (models.ModelError, StorageError, SpecError, chain.ChainUnavailable) as exc:
        sys.exit(f"run.py {args.command}: {exc}")


def cmd_score(args: argparse.Namespace) -> None:
    """Score a data file with a round's model: its metrics when the file has the label, and each
    row's answer with --output."""
    import json

    from infra import models
    from processor.device_data import DeviceDataError

    published = published_model(args)
    try:
        metrics, predictions = models.score(published, args.data)
    except DeviceDataError as exc:
        sys.exit(f"run.py score: {exc}")
    rows = len(predictions["predicted"])
    if metrics is None:
        print(f"{args.data}: {rows} rows scored by {published.cid} (no label column: no metrics)")
    else:
        print(f"{args.data}: {rows} rows, {published.task.describe(metrics)} ({published.cid}): {json.dumps(metrics)}")
    if args.output:
        models.write_predictions(predictions, args.output)
        print(f"each row's answer: {args.output}")


def cmd_export(args: argparse.Namespace) -> None:
    from infra import models

    written = models.export(published_model(args), args.output)
    print(f"wrote {', '.join(str(path) for path in written)}")


def cmd_compile(args: argparse.Namespace) -> None:
    from infra import chain

    print(f"compiled the round registry into {chain.compile_artifact()}")


def cmd_chain(args: argparse.Namespace) -> None:
    from infra import chain

    settings = settings_from(args)
    with chain.local_chain(settings.chain_node, settings.chain_url, settings.state_dir) as node:
        if node.reused:  # someone else's: left alone, and not this command's to stop
            print(f"a chain is already running at {settings.chain_url}; nothing started")
            return
        wait_forever(f"{node.name} started at {settings.chain_url}")


def cmd_ipfs(args: argparse.Namespace) -> None:
    from infra import ipfs

    settings = settings_from(args)
    with ipfs.IPFSDaemon.for_api(settings.ipfs_api, repo_dir=settings.state_dir / "ipfs",
                                    log_path=settings.state_dir / "logs" / "ipfs.log") as daemon:
        if daemon.reused:
            print(f"an IPFS node is already running at {settings.ipfs_api}; nothing started")
            return
        wait_forever(f"IPFS daemon started at {settings.ipfs_api}")


def cmd_demo(args: argparse.Namespace) -> None:
    from demo import DemoError, DemoOptions, run_demo

    options = DemoOptions(task=args.task, clients=args.clients, rounds=args.rounds, partition=partition_of(args),
                          training=plan_from(args), alpha=args.alpha,
                          seed=args.seed,
                          bounds=args.bounds, privacy=args.privacy, embedded=args.embedded, drive=args.drive,
                          round_seconds=args.round_seconds, keep=args.keep, json_path=args.json,
                          org_port=args.port, first_client_port=args.client_port)
    try:
        run_demo(options, settings_from(args))
    except (DemoError, KeyboardInterrupt) as exc:
        sys.exit(f"demo stopped: {str(exc) or 'interrupted (Ctrl-C)'}")  # KeyboardInterrupt says nothing itself


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, handler, help: str, services: tuple[str, ...], example: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help, formatter_class=HelpFormatter,
                                  epilog=f"example:\n  {example}")
        for service in services:
            flag, kind, text, *choices = SERVICE_FLAGS[service]
            sub.add_argument(flag, dest=service, type=kind, help=text, choices=choices[0] if choices else None)
        sub.set_defaults(handler=handler)
        return sub

    def bounds_flag(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--bounds", default="median", choices=["median", "none"],
                         help="bound each client's influence by the round's medians (weight, norm, direction), "
                              "or not at all: plain FedAvg, as Flower's")

    def max_samples_flag(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--max-samples", type=int, help="the most samples a submission may claim (its FedAvg "
                                                         "weight) in a contract deployed here (default 1,000,000)")

    def rounds_flags(sub: argparse.ArgumentParser, round_seconds: int = 300) -> None:
        sub.add_argument("--round-seconds", type=int, default=round_seconds,
                         help="seconds from a round's opening to its deadline, 0 for none")
        sub.add_argument("--quorum", type=int, default=1, help="the fewest updates a round is merged from")
        sub.add_argument("--invite", type=float, default=100.0,
                         help="percent of the enrolled clients each round invites, drawn from the chain")

    def verbose_flag(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--verbose", action="store_true",
                         help="log INFO lines too: what each step does")

    def debug_flag(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--debug", action="store_true",
                         help="serve with Werkzeug's development server instead of waitress")

    def task_flag(sub: argparse.ArgumentParser, spec: str = "") -> None:
        """--task; with `spec`, what else names a task spec (for the README: "Your own problem")."""
        text = ("what is learned: handwritten digits (mnist, digits) or whether a user likes a film (interest)"
                + (f", or your own problem: {spec}" if spec else ""))
        if spec:
            sub.add_argument("--task", default="mnist", type=task_reference, help=text)
        else:
            sub.add_argument("--task", default="mnist", choices=list(TASKS), help=text)

    def data_flags(sub: argparse.ArgumentParser, spec: str = "") -> None:
        task_flag(sub, spec)
        sub.add_argument("--partition", choices=SCHEMES,
                         help="how the bundled dataset is split among the clients (default: the task's own: "
                              "by-user for interest, each client a group of MovieLens users; iid for the others)")
        sub.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration (--partition dirichlet)")

    everything = ("chain_url", "ipfs_api", "state_dir", "contract_record")  # an app's; the demo's and chain's add the node
    app = command("app", cmd_app, "the organization's app", everything,
                  "python run.py app --rounds 10  # runs 10 rounds by itself; dashboard on http://127.0.0.1:5000")
    task_flag(app, "a task spec file (run.py task init drafts one)")
    app.add_argument("--test-data", type=Path, help="with a task spec: the organization's own rows of its columns, "
                                                    "a CSV file it measures every round on (its test set); "
                                                    "without one, the devices' held-out evaluation is shown")
    app.add_argument("--host", default="127.0.0.1", help="address to serve the dashboard and API on")
    app.add_argument("--port", type=int, default=5000, help="port to serve the dashboard and API on")
    debug_flag(app)
    verbose_flag(app)
    app.add_argument("--seed", type=int, default=0, help="seed of the initial model")
    TrainingSettings.add_flags(app, plans=TASK_PLANS)  # the round plan: how every client trains
    app.add_argument("--pretrain-epochs", type=int, default=0,
                     help="pretrain the first model on the organization's data")
    app.add_argument("--aggregation", default="fedavg", choices=AGGREGATIONS, help="how the updates are merged")
    app.add_argument("--clip-norm", type=float, default=None, help="clip each update to this L2 norm")
    PrivacyPlan.add_flags(app)  # how every client privatizes its delta: client-level differential privacy
    bounds_flag(app)
    app.add_argument("--open-enrolment", action="store_true",
                     help="deploy a contract that lets any account submit, instead of enrolled clients only")
    max_samples_flag(app)
    rounds_flags(app)
    app.add_argument("--rounds", type=int, default=0,
                     help="run this many rounds by itself (0: only when asked, by the dashboard's buttons or the API)")
    app.add_argument("--target-accuracy", type=float, help="running by itself, stop once the merged model's test "
                                                           "accuracy reaches this (0-1)")
    app.add_argument("--stage-seconds", type=float, default=10.0,
                     help="secure aggregation: the longest a round waits for the clients' keys, for their secret "
                          "shares, and for the shares revealed of those that dropped out (default: %(default)s)")

    cli = command("client", cmd_client, "one device's app", everything,
                  "python run.py client --id 0 --clients 3  # takes part in every round; page on "
                  "http://127.0.0.1:5100")
    data_flags(cli, "a task spec file, or the CID the organization published its spec under")
    cli.add_argument("--id", type=int, required=True, help="client number K (its data partition)")
    cli.add_argument("--clients", type=int, default=2, help="number of clients the data is split among")
    cli.add_argument("--data", type=Path, help="the device's own data: a CSV file with the task's columns "
                                               "(README.md); default: partition K of the bundled dataset")
    cli.add_argument("--key", help="private key (default: Ganache deterministic account K + 1, and for K of 19 and "
                                   "up a key derived from a fixed seed, as run.py clients uses)")
    cli.add_argument("--account", type=int, help="use Ganache deterministic account N")
    cli.add_argument("--host", default="127.0.0.1", help="address to serve the page and API on")
    cli.add_argument("--port", type=int, help="port to serve the page and API on (default: 5100 + K)")
    debug_flag(cli)
    verbose_flag(cli)
    cli.add_argument("--seed", type=int, default=0, help="seed of the partition and of local training's batch order")
    cli.add_argument("--manual", action="store_true",
                     help="take part only when asked (the page's buttons or the API), not in every round by itself")
    cli.add_argument("--train-delay", type=float, default=0.0,
                     help="seconds added to every round's training: a slow device (the demo's straggler)")

    group = command("clients", cmd_clients, "many devices in one process, each taking part in every round by itself",
                    everything, "python run.py clients --count 100  # clients 0-99, status on "
                                "http://127.0.0.1:5099/api/status; enrol them with `run.py enrol --clients-of 100`")
    data_flags(group, "a task spec file, or the CID the organization published its spec under")
    group.add_argument("--data", type=Path, help="each device's own data, named with {id}: 'devices/device{id}.csv' "
                                                 "(default: partition K of the bundled dataset)")
    group.add_argument("--count", type=int, required=True, help="number of devices N")
    group.add_argument("--first-id", type=int, default=0, help="the first device's client number K: the devices "
                                                                "are K .. K + N - 1 (their partitions and keys)")
    group.add_argument("--clients", type=int, help="number of clients the data is split among (default: K + N)")
    group.add_argument("--host", default="127.0.0.1", help="address to serve the devices' status on")
    group.add_argument("--port", type=int, default=5099, help="port to serve the devices' status on "
                                                               "(GET /api/status)")
    debug_flag(group)
    verbose_flag(group)
    group.add_argument("--seed", type=int, default=0, help="seed of the partition and of local training's batch order")
    group.add_argument("--train-delay", type=float, default=0.0, help="seconds added to every round's training")

    deploy = command("deploy", cmd_deploy, "deploy the round registry and record its address",
                     ("chain_url", "state_dir", "contract_record"), "python run.py deploy --open-enrolment")
    deploy.add_argument("--open-enrolment", action="store_true",
                        help="let any account submit, instead of enrolled clients only")
    max_samples_flag(deploy)
    enrol = command("enrol", cmd_enrol, "enrol client accounts in the recorded round registry (organization's key)",
                    ("chain_url", "state_dir", "contract_record"),
                    "python run.py enrol 0xFFcf8FDEE72ac11b5c542428B35EEF5769C409f0")
    enrol.add_argument("addresses", nargs="*", metavar="ADDRESS", help="a client's Ethereum address")
    enrol.add_argument("--clients-of", type=int, metavar="N",
                       help="instead of addresses: the N accounts of `run.py clients --count N`, each funded first "
                            "from the organization's account when it holds less than 0.1 ether")
    enrol.add_argument("--first-id", type=int, default=0, help="with --clients-of: the group's first client id")
    task = command("task", cmd_task, "draft a task spec (the problem as a document: columns, label, Keras model) "
                   "from a data file, or check a spec and data files against it",
                   (), "python run.py task init device.csv --label opened --output offer.json")
    task.add_argument("action", choices=["init", "check"], help="init: draft a spec from a CSV; check: read a spec "
                                                                "(and data files) and say what it holds")
    task.add_argument("files", nargs="+", type=Path, metavar="FILE",
                      help="init: the CSV; check: the spec, then any data files to check against it")
    task.add_argument("--label", help="init: the column to predict")
    task.add_argument("--name", default="task", help="init: the task's name")
    task.add_argument("--output", type=Path, help="init: write the spec here (default: standard output)")
    model_help = "the model: its CID, or the number of the round that merged it (read from the chain)"
    score = command("score", cmd_score, "score a data file with a round's model: its test metrics, each row's answer",
                    everything, "python run.py score 10 test.csv --task offer.json --output answers.csv")
    score.add_argument("model", help=model_help)
    score.add_argument("data", type=Path, help="a CSV file of the task's columns (a spec's may leave out the label)")
    task_flag(score, "a task spec file, or the CID its spec was published under")
    score.add_argument("--output", type=Path, help="write each row's answer here (CSV: the prediction, and each "
                                                   "class's probability)")
    export = command("export", cmd_export, "export a round's model as a Keras file (and its task spec beside it)",
                     everything, "python run.py export 10 --task offer.json --output offer.keras")
    export.add_argument("model", help=model_help)
    task_flag(export, "a task spec file, or the CID its spec was published under")
    export.add_argument("--output", type=Path, required=True, help="the Keras file to write (*.keras)")
    command("compile", cmd_compile, "compile the contract into build/contracts/RoundRegistry.json (setup.sh does it)",
            (), "python run.py compile")
    command("chain", cmd_chain, "start a chain node (Ganache, or anvil) and keep it running",
            ("chain_url", "chain_node", "state_dir"), "python run.py chain --node anvil --chain-url http://127.0.0.1:8545")
    command("ipfs", cmd_ipfs, "start the IPFS daemon and keep it running", ("ipfs_api", "state_dir"),
            "python run.py ipfs --ipfs-api http://127.0.0.1:5001")

    demo = command("demo", cmd_demo, "the whole system, several rounds", (*everything, "chain_node"),
                   "python run.py demo --task interest --partition by-user --clients 5 --rounds 10")
    data_flags(demo)
    TrainingSettings.add_flags(demo, plans=TASK_PLANS)
    demo.add_argument("--clients", type=int, default=3, help="number of client processes")
    bounds_flag(demo)
    demo.add_argument("--private", action="store_true",
                      help=f"client-level differential privacy and secure aggregation: each client clips its "
                           f"delta to L2 norm {PRIVATE_DEMO.clip_norm:g}, adds its share of Gaussian noise of std "
                           f"{PRIVATE_DEMO.noise_multiplier:g} x that on the sum, and masks it so that the "
                           f"organization sees only the sum of at least {PRIVATE_DEMO.threshold} (the flags below "
                           f"change each)")
    PrivacyPlan.add_flags(demo, preset="--private's")
    demo.add_argument("--rounds", type=int, default=5, help="rounds to run")
    demo.add_argument("--embedded", action="store_true", help="eth-tester and the on-disk store, one process")
    demo.add_argument("--drive", action="store_true", help="drive every round through the apps' HTTP APIs instead "
                                                           "of letting the network run by itself")
    demo.add_argument("--round-seconds", type=int, default=20, help="each round's deadline")
    demo.add_argument("--keep", action="store_true", help="leave the dashboards up")
    demo.add_argument("--port", type=int, default=5000, help="the organization's dashboard port")
    demo.add_argument("--client-port", type=int, default=5100, help="client 0's page port; client K's is this + K")
    verbose_flag(demo)
    demo.add_argument("--json", type=Path, help="write the per-round results here")
    demo.add_argument("--seed", type=int, default=0, help="initial model, partitions and batch order")

    args = parser.parse_args(argv)
    if hasattr(args, "privacy_noise_multiplier"):  # refused at once, before TensorFlow loads
        try:
            args.privacy = PrivacyPlan.from_args(args, base=PRIVATE_DEMO if getattr(args, "private", False) else None)
        except ValueError as exc:
            parser.error(str(exc))
        if args.privacy.secure_aggregation:
            secure_aggregation_allowed(parser, args)
        if hasattr(args, "regularizer"):
            try:
                args.privacy.refuse_regularizer(plan_from(args).regularizer)
            except ValueError as exc:
                parser.error(str(exc))
    signal.signal(signal.SIGTERM, interrupt_on_sigterm)
    configure_logging(getattr(args, "verbose", False))
    if args.command in TENSORFLOW_COMMANDS:
        load_tensorflow_quietly()
    run_command(args)


def run_command(args: argparse.Namespace) -> None:
    """Run the parsed command. A failure it expects (a service down, a contract's refusal, a
    missing build) is said in one line, and its traceback goes to the state directory's log."""
    from infra import chain, ipfs
    from infra.processes import ServiceError

    try:
        args.handler(args)
    except (chain.ChainUnavailable, chain.ContractError, chain.ArtifactError, ipfs.StorageError,
            ServiceError) as exc:
        log_path = settings_from(args).state_dir / "logs" / "run.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("a") as log:
            log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} run.py {args.command}\n{traceback.format_exc()}\n")
        sys.exit(f"run.py {args.command}: {exc} (details in {log_path})")


if __name__ == "__main__":
    main()
