"""``medledger bench``."""

from __future__ import annotations

from pathlib import Path

import click

from medledger.cli.common import number_option

__all__ = ["bench"]


# Options several benchmarks take (the first three: every one).
_work_dir = click.option(
    "--dir",
    "root",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where the benchmark keeps its nodes (default: a temporary directory, removed after).",
)
_json_out = click.option(
    "--json-out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write results as JSON here.",
)
_quick = click.option("--quick", is_flag=True, help="Small sizes: a smoke run in seconds.")
_dsn = click.option(
    "--dsn",
    default=None,
    help="PostgreSQL DSN to use (default: an embedded server started for the run).",
)
# The summary in docs/benchmarks.md: written by ``bench hybrid`` and by ``bench all``.
_markdown = click.option(
    "--markdown",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Update the generated summary in this file (default: docs/benchmarks.md unless --quick).",
)


@click.group()
@click.pass_context
def bench(ctx: click.Context) -> None:
    """Benchmarks; results go to docs/benchmarks.md style tables and JSON."""
    from medledger.localnet.process_tree import children_torn_down

    # SIGTERM/SIGINT unwind through each benchmark's own cleanup, then whatever it
    # started and is still running (institution processes, nats-servers) is stopped.
    ctx.with_resource(children_torn_down())


@bench.command("private")
@_work_dir
@number_option("--txs", low=100, default=200_000, help="Transactions for the throughput run.")
@number_option("--writers", low=1, default=256)
@number_option("--rate", low=1, default=2_000, help="Offered load (tx/s) for the latency run.")
@number_option(
    "--proof-log",
    low=0,
    default=1_000_000,
    help="Log size for the proof and full-verify run (0 to skip).",
)
@_json_out
@_quick
@click.option(
    "--store",
    type=click.Choice(["sqlite", "postgres", "both"]),
    default="sqlite",
    show_default=True,
    help="Chain store to measure; 'both' reports SQLite and PostgreSQL side by side.",
)
@_dsn
def bench_private(
    root: Path | None,
    txs: int,
    writers: int,
    rate: int,
    proof_log: int,
    json_out: Path | None,
    quick: bool,
    store: str,
    dsn: str | None,
) -> None:
    """Private-chain throughput, latency, proofs and verify; group commit vs one fsync per tx."""
    from medledger.benchmarks.private import run_private_bench

    run_private_bench(
        root=root,
        txs=txs,
        writers=writers,
        rate=rate,
        proof_log=proof_log,
        json_out=json_out,
        quick=quick,
        store=store,
        dsn=dsn,
    )


@bench.command("records")
@_work_dir
@number_option("--patients", low=1, default=1_000)
@number_option("--per-patient", low=1, default=100, help="Resources per patient.")
@number_option("--writers", low=1, default=64)
@_json_out
@_quick
@number_option(
    "--validation-workers",
    "workers",
    low=0,
    default=0,
    help="Processes validating FHIR beside the event loop (0 = inline).",
)
def bench_records(
    root: Path | None,
    patients: int,
    per_patient: int,
    writers: int,
    json_out: Path | None,
    quick: bool,
    workers: int,
) -> None:
    """Encrypted FHIR creates, reads and blind-index search; cost per stage."""
    from medledger.benchmarks.records import run_records_bench

    run_records_bench(
        root=root,
        patients=patients,
        per_patient=per_patient,
        writers=writers,
        json_out=json_out,
        quick=quick,
        workers=workers,
    )


@bench.command("consortium")
@_work_dir
@click.option(
    "--ordering",
    "orderings",
    multiple=True,
    type=click.Choice(["solo", "jetstream"]),
    default=("solo", "jetstream"),
    show_default=True,
)
@number_option("--members", "sizes", low=1, multiple=True, default=(4, 7, 10))
@number_option("--rate", low=1, default=1_000)
@number_option("--seconds", low=0.1, default=3.0)
@number_option("--txs", low=10, default=4_000, help="Transactions for the throughput run.")
@_json_out
@_quick
def bench_consortium(
    root: Path | None,
    orderings: tuple[str, ...],
    sizes: tuple[int, ...],
    rate: int,
    seconds: float,
    txs: int,
    json_out: Path | None,
    quick: bool,
) -> None:
    """Consortium submit-to-final latency and throughput, solo and JetStream, 4/7/10 members."""
    from medledger.benchmarks.consortium import run_consortium_bench

    run_consortium_bench(
        root=root,
        orderings=orderings,
        sizes=sizes,
        rate=rate,
        seconds=seconds,
        txs=txs,
        json_out=json_out,
        quick=quick,
    )


@bench.command("hybrid")
@_work_dir
@click.option(
    "--ordering",
    "orderings",
    multiple=True,
    type=click.Choice(["jetstream", "solo"]),
    default=("jetstream", "solo"),
    show_default=True,
)
@click.option(
    "--mode",
    "modes",
    multiple=True,
    type=click.Choice(["hybrid", "consortium-only"]),
    default=("hybrid", "consortium-only"),
    show_default=True,
)
@click.option(
    "--institutions",
    default="4",
    show_default=True,
    help="Institutions; a list such as 4,8,16 runs the scale sweep at each size.",
)
@click.option(
    "--rtt",
    default=None,
    help="Round trip(s) between institutions in ms through a delaying link, e.g. 0,10,40"
    " (the scale sweep; default: plain loopback). As root, each institution runs in a"
    " network namespace of its own; elsewhere on loopback (the results say which).",
)
@click.option("--jitter", type=click.FloatRange(min=0, max=1000), default=0.0, help="Jitter, ms.")
@click.option(
    "--loss", type=click.FloatRange(min=0, max=50), default=0.0, help="Loss, % (as TCP delays)."
)
@click.option(
    "--cpu-per-institution",
    type=click.FloatRange(min=0.01, max=256),
    default=None,
    help="Each institution's processes in a cgroup limited to this many cores (the scale sweep).",
)
@click.option(
    "--cpu-per-nats-server",
    type=click.FloatRange(min=0.01, max=256),
    default=None,
    help="Each NATS server in a cgroup of its own limited to this many cores, apart from the"
    " institutions' (default: it shares its institution's group).",
)
@number_option(
    "--anchor-interval",
    low=10,
    default=200,
    help="The consortium's anchor interval in ms (the genesis default is 200).",
)
@click.option(
    "--anchor-interval-per-institution",
    "anchor_interval_scales",
    is_flag=True,
    help="Read --anchor-interval as per institution: the interval is it times the"
    " institutions, so each member's consortium work per second stays the same as the"
    " consortium grows (the scale sweep).",
)
@click.option(
    "--load",
    "loads",
    multiple=True,
    type=click.IntRange(min=1),
    help="Offered loads in records/s (default: 100, doubling up to --max-load or saturation).",
)
@number_option("--max-load", low=1, default=3_200)
@number_option("--seconds", low=0.1, default=5.0, help="Duration of each offered load.")
@number_option("--writers", low=1, default=64, help="Concurrent writers per institution.")
@number_option("--warmup", low=0, default=200)
@click.option("--seed", type=int, default=11, show_default=True)
@click.option(
    "--one-process",
    is_flag=True,
    help="Run every institution in the benchmark process (default: one process each).",
)
@_json_out
@_quick
@click.option(
    "--plots-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Write the PNG plots here (default: docs/ unless --quick).",
)
@_markdown
def bench_hybrid(
    root: Path | None,
    orderings: tuple[str, ...],
    modes: tuple[str, ...],
    institutions: str,
    rtt: str | None,
    jitter: float,
    loss: float,
    cpu_per_institution: float | None,
    cpu_per_nats_server: float | None,
    anchor_interval: int,
    anchor_interval_scales: bool,
    loads: tuple[int, ...],
    max_load: int,
    seconds: float,
    writers: int,
    warmup: int,
    seed: int,
    one_process: bool,
    json_out: Path | None,
    quick: bool,
    plots_dir: Path | None,
    markdown: Path | None,
) -> None:
    """Hybrid vs consortium-only: validation and tamper-evidence delay, saturation, CPU."""
    from medledger.benchmarks.hybrid import HybridSettings
    from medledger.benchmarks.hybrid_run import run_hybrid_bench

    sizes = tuple(int(n) for n in _numbers("--institutions", institutions, 1, 64, whole=True))
    rtts = _numbers("--rtt", rtt, 0, 2000) if rtt is not None else ()
    scale = (
        bool(rtts)
        or len(sizes) > 1
        or cpu_per_institution is not None
        or cpu_per_nats_server is not None
    )
    if not quick:
        plots_dir = plots_dir or _default_docs_path("")
        markdown = markdown or _default_docs_path("benchmarks.md")
    settings = HybridSettings(
        institutions=sizes[0],
        jitter_ms=jitter,
        loss_pct=loss,
        cpu_per_institution=cpu_per_institution,
        cpu_per_nats_server=cpu_per_nats_server,
        anchor_interval_ms=anchor_interval,
        anchor_interval_scales=anchor_interval_scales,
        orderings=orderings,
        modes=modes,
        loads=loads,
        max_load=max_load,
        step_seconds=seconds,
        writers=writers,
        warmup=warmup,
        seed=seed,
        one_process=one_process,
    )
    if scale:
        from medledger.benchmarks.hybrid_scale import run_hybrid_scale

        if one_process:
            raise click.UsageError("the scale sweep runs one process per institution")
        run_hybrid_scale(
            root=root,
            settings=settings,
            rtts=rtts or (None,),
            sizes=sizes,
            json_out=json_out,
            quick=quick,
            plots_dir=plots_dir,
            markdown=markdown,
        )
        return
    run_hybrid_bench(
        root=root,
        settings=settings,
        json_out=json_out,
        quick=quick,
        plots_dir=plots_dir,
        markdown=markdown,
    )


def _numbers(
    option: str, text: str, low: float, high: float, *, whole: bool = False
) -> tuple[float, ...]:
    """``4,8,16`` as numbers within ``[low, high]`` (``whole``: integers), or a usage error."""
    try:
        values = tuple((int if whole else float)(part) for part in text.split(","))
    except ValueError:
        raise click.BadParameter(
            f"a comma-separated list of numbers, not {text!r}", param_hint=option
        ) from None
    if not values or any(not low <= v <= high for v in values):
        raise click.BadParameter(f"each value is {low:g} to {high:g}", param_hint=option)
    return values


@bench.command("sharing")
@_work_dir
@click.option(
    "--kem",
    "kems",
    multiple=True,
    type=click.Choice(["MLKEM768_X25519", "X25519"]),
    default=("MLKEM768_X25519", "X25519"),
    show_default=True,
    help="HPKE KEMs to measure side by side (one fresh network each).",
)
@number_option("--resources", low=1, default=20)
@number_option("--fetches", low=1, default=500, help="Fetches one at a time, for latency.")
@number_option(
    "--concurrency",
    low=1,
    multiple=True,
    default=(16, 64),
    help="Fetches in flight for the throughput runs (repeat for more runs).",
)
@number_option("--throughput-fetches", low=1, default=2_000)
@number_option("--hpke-rounds", low=1, default=2_000)
@click.option(
    "--holder-in-process",
    is_flag=True,
    help="Serve the holder in the benchmark process too (default: its own node process).",
)
@_json_out
@_quick
def bench_sharing(
    root: Path | None,
    kems: tuple[str, ...],
    resources: int,
    fetches: int,
    concurrency: tuple[int, ...],
    throughput_fetches: int,
    hpke_rounds: int,
    holder_in_process: bool,
    json_out: Path | None,
    quick: bool,
) -> None:
    """Verified cross-institution fetches over loopback HTTP, ML-KEM hybrid vs X25519."""
    from medledger.benchmarks.sharing import SharingSettings, run_sharing_bench

    run_sharing_bench(
        root=root,
        settings=SharingSettings(
            kems=kems,
            resources=resources,
            latency_fetches=fetches,
            concurrency=concurrency,
            throughput_fetches=throughput_fetches,
            hpke_rounds=hpke_rounds,
            holder_process=not holder_in_process,
        ),
        json_out=json_out,
        quick=quick,
    )


@bench.command("api")
@_work_dir
@number_option("--creates", low=1, default=10_000)
@number_option("--reads", low=1, default=20_000)
@number_option("--clients", low=1, default=64)
@number_option(
    "--client-processes",
    low=1,
    multiple=True,
    default=(1,),
    help="Processes the clients are split over (repeat: each count is one run).",
)
@_json_out
@_quick
def bench_api(
    root: Path | None,
    creates: int,
    reads: int,
    clients: int,
    client_processes: tuple[int, ...],
    json_out: Path | None,
    quick: bool,
) -> None:
    """FHIR creates and reads over HTTP (one node process) vs the in-process API."""
    from medledger.benchmarks.api import ApiSettings, run_api_bench

    run_api_bench(
        root=root,
        settings=ApiSettings(
            creates=creates, reads=reads, clients=clients, client_processes=client_processes
        ),
        json_out=json_out,
        quick=quick,
    )


@bench.command("workers")
@_work_dir
@number_option(
    "--workers",
    "worker_counts",
    low=1,
    multiple=True,
    default=(1, 2),
    help="API worker processes (repeat: each count is one run; start with 1).",
)
@number_option("--creates", low=1, default=5_000)
@number_option("--reads", low=1, default=10_000)
@number_option("--clients", low=1, default=64)
@number_option(
    "--open-loop-seconds",
    low=1,
    default=10.0,
    help="How long each open-loop point (50 %, 80 % of saturation) sends.",
)
@click.option(
    "--cpu-per-worker",
    type=click.FloatRange(min=0.01, max=64),
    default=None,
    help="Run the node's processes in a cgroup of N x this many cores for the run with N "
    "workers; the load generator keeps the rest of the machine (needs root and cgroups).",
)
@number_option(
    "--client-processes",
    low=1,
    high=64,
    default=1,
    help="Processes the load generator's clients are split over.",
)
@_json_out
@_quick
def bench_workers(
    root: Path | None,
    worker_counts: tuple[int, ...],
    creates: int,
    reads: int,
    clients: int,
    open_loop_seconds: float,
    cpu_per_worker: float | None,
    client_processes: int,
    json_out: Path | None,
    quick: bool,
) -> None:
    """HTTP reads and creates with 1 and N API worker processes; open-loop p50/p99."""
    from medledger.benchmarks.workers import run_workers_bench

    run_workers_bench(
        root=root,
        workers=worker_counts,
        creates=creates,
        reads=reads,
        clients=clients,
        open_loop_s=open_loop_seconds,
        json_out=json_out,
        quick=quick,
        cpu_per_worker=cpu_per_worker,
        client_processes=client_processes,
    )


@bench.command("failover")
@_work_dir
@_dsn
@number_option("--writers", low=1, default=4, help="Writing clients per host.")
@number_option("--api-workers", low=1, default=1, help="node start --workers of each host.")
@_json_out
@_quick
def bench_failover(
    root: Path | None,
    dsn: str | None,
    writers: int,
    api_workers: int,
    json_out: Path | None,
    quick: bool,
) -> None:
    """Kill the active sequencer under writes: seconds to the next acknowledged write, writes lost."""
    from medledger.benchmarks.failover import FailoverSettings, run_failover_bench

    run_failover_bench(
        root=root,
        dsn=dsn,
        settings=FailoverSettings(writers=writers, api_workers=api_workers),
        json_out=json_out,
        quick=quick,
    )


@bench.command("tls")
@_work_dir
@number_option("--requests", low=1, default=20_000)
@number_option("--connections", low=1, default=500)
@number_option("--clients", low=1, default=16)
@number_option("--publishes", low=1, default=2_000)
@number_option("--fetches", low=1, default=2_000)
@_json_out
@_quick
def bench_tls(
    root: Path | None,
    requests: int,
    connections: int,
    clients: int,
    publishes: int,
    fetches: int,
    json_out: Path | None,
    quick: bool,
) -> None:
    """The API, the cross-institution fetch and JetStream ordering: TLS vs plaintext, one run."""
    from medledger.benchmarks.tls import TlsSettings, run_tls_bench

    run_tls_bench(
        root=root,
        settings=TlsSettings(
            requests=requests,
            connections=connections,
            clients=clients,
            publishes=publishes,
            fetches=fetches,
        ),
        json_out=json_out,
        quick=quick,
    )


@bench.command("faults")
@_work_dir
@number_option("--kills", low=1, default=10, help="SIGKILLs of the node under concurrent writers.")
@number_option("--writers", low=1, default=16)
@number_option(
    "--writes-per-round",
    low=1,
    default=200,
    help="Acknowledged writes between one restart and the next kill.",
)
@number_option(
    "--nats-rounds",
    low=0,
    default=3,
    help="Times a member's nats-server is SIGSTOPped (0: skip the NATS part).",
)
@_json_out
@_quick
def bench_faults(
    root: Path | None,
    kills: int,
    writers: int,
    writes_per_round: int,
    nats_rounds: int,
    json_out: Path | None,
    quick: bool,
) -> None:
    """Acknowledged vs lost writes over SIGKILLs, time to ready, hung-NATS failover stall."""
    from medledger.benchmarks.faults import FaultSettings, run_faults_bench

    run_faults_bench(
        root=root,
        settings=FaultSettings(
            kills=kills,
            writers=writers,
            writes_per_round=writes_per_round,
            nats_rounds=nats_rounds,
        ),
        json_out=json_out,
        quick=quick,
    )


def _default_docs_path(name: str) -> Path | None:
    """``docs/<name>`` when run from the repository (where docs/ exists), else nothing."""
    docs = Path("docs")
    return (docs / name if name else docs) if docs.is_dir() else None


#: ``bench all`` runs these first, in this order; any other subcommand follows by name.
_ORDER = ("private", "records", "consortium", "sharing", "api", "hybrid")


@bench.command("all")
@_work_dir
@_quick
@click.option(
    "--results-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("bench/results"),
    show_default=True,
    help="One JSON file per benchmark: <name>.json.",
)
@_markdown
@click.pass_context
def bench_all(
    ctx: click.Context,
    root: Path | None,
    quick: bool,
    results_dir: Path,
    markdown: Path | None,
) -> None:
    """Every registered benchmark with its defaults (or --quick), then the summary."""
    import json
    import time

    from rich.console import Console

    from medledger.benchmarks.report import update_markdown

    assert ctx.parent is not None
    group = ctx.parent.command
    assert isinstance(group, click.Group)
    names = sorted(
        (n for n in group.commands if n != "all"),
        key=lambda n: (_ORDER.index(n) if n in _ORDER else len(_ORDER), n),
    )
    console = Console(stderr=True)
    started = time.perf_counter()
    results: dict[str, dict[str, object]] = {}
    for i, name in enumerate(names, 1):
        command = group.commands[name]
        accepts = {p.name for p in command.params}
        out = results_dir / f"{name}.json"
        args = ["--json-out", str(out)] if "json_out" in accepts else []
        if quick and "quick" in accepts:
            args.append("--quick")
        if root is not None and "root" in accepts:
            args += ["--dir", str(root / name)]
        if name == "hybrid" and markdown is not None:
            args += ["--markdown", str(markdown)]
        elapsed = time.perf_counter() - started
        console.rule(f"[bold]bench {name}[/] ({i}/{len(names)}, {elapsed:,.0f} s so far)")
        with command.make_context(name, args, parent=ctx) as sub:
            command.invoke(sub)
        if out.exists():
            results[name] = json.loads(out.read_text())
    if not quick:
        markdown = markdown or _default_docs_path("benchmarks.md")
    if markdown is not None:
        update_markdown(markdown, results)
    console.rule(f"bench all: {len(results)} results in {time.perf_counter() - started:,.0f} s")
