"""Runs a Beam pipeline on a Dask cluster (``--runner dask``): Beam's DaskRunner, fixed and fused.

Beam's ``apache_beam.runners.dask.dask_runner.DaskRunner`` (2.78) gives every consumer of a
multi-output ParDo one mixed bag of all its outputs, turns ``Reshuffle`` into a no-op, evaluates
side inputs by nested computes inside tasks, computes only the last transform's bag (other
leaves never run, and their errors never surface) and sets a DoFn up again for every partition.
This runner keeps Beam's execution of a DoFn (``DoFnRunner``: the same invoker, side-input views
and outputs as Beam's other Python runners) and translates the pipeline into one Dask task graph
the way Beam's fusing runners do:

- a PCollection is a list of partitions, each a Dask task expression; a ParDo wraps its input's
  expression, so a chain of ParDos/Maps runs in one task per partition (fusion); a PCollection
  read by more than one consumer becomes a task of its own, a multi-output ParDo's result is a
  ``{tag: elements}`` partition that each output picks from (outputs tracked per PCollection);
- ``GroupByKey`` is a hash shuffle into ``--dask_npartitions`` partitions (a stable hash, so a
  recomputed partition sends every element where it went the first time); ``CombinePerKey``
  combines within each input partition before the shuffle (combiner lifting); ``Reshuffle``
  deals elements round-robin into the partitions (redistributes, deterministically);
- a side input is one task holding its whole value, a dependency of its consumers' tasks (no
  nested compute, no key shared with another graph);
- every leaf is computed (as a count, so no output travels to the client), and the first failed
  task fails the run with its own exception; a cluster without workers, or a lost scheduler,
  fails the run too instead of waiting for ever;
- a DoFn is unpickled and set up once per worker thread and run (``setup``), each partition is a
  bundle (``start_bundle``/``finish_bundle``).

Only the global window is supported (what batch pipelines such as this one use); anything else
is refused when the pipeline is translated. Without ``--dask_client_address`` a local cluster of
worker processes (one per core, one thread each) is started for the run and stopped after it.
"""
from __future__ import annotations

import itertools
import logging
import os
import pickle
import threading
import time
import uuid
import zlib
from collections import defaultdict

import apache_beam as beam
from apache_beam import pvalue
from apache_beam.internal import pickler
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.pipeline import PipelineVisitor
from apache_beam.runners.dask.dask_runner import DaskOptions
from apache_beam.runners.common import DoFnRunner, Receiver
from apache_beam.runners.runner import PipelineResult, PipelineRunner, PipelineState
from apache_beam.transforms.core import CombineFn, Windowing
from apache_beam.transforms.sideinputs import SideInputMap
from apache_beam.transforms.window import GlobalWindow, GlobalWindows
from apache_beam.utils.windowed_value import WindowedValue

_LOG = logging.getLogger(__name__)

NAMES = ("dask", "daskrunner")  # --runner values (any case) that choose this runner
NO_WORKER_GRACE = 30.0          # seconds a cluster may be without workers or scheduler before the run fails
PARTITIONS_PER_THREAD = 4       # default partitions after a shuffle, per worker thread


class DaskClusterOptions(PipelineOptions):
    """How to start a local cluster when no ``--dask_client_address`` is given (Beam's
    ``DaskOptions`` has the address, ``--dask_npartitions`` and the connection options)."""

    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument("--dask_workers", type=int, default=None,
                            help="worker processes of the local cluster (default: one per core)")
        parser.add_argument("--dask_worker_memory", default=None,
                            help="memory limit per worker of the local cluster, e.g. 2GiB (default: the "
                                 "machine's memory shared out); a worker near it spills to disk")


def wanted(runner_name: str | None) -> bool:
    return runner_name is not None and runner_name.lower() in NAMES


# --- on the workers ----------------------------------------------------------------------------
# What a worker process keeps between tasks of one run: set-up DoFns and CombineFns per thread,
# side-input views. Another run's entries are torn down when a task of a new run arrives.

_cache_lock = threading.Lock()
_cache: dict = {"run": None, "items": {}}


def _cached(run: str, key, make):
    with _cache_lock:
        if _cache["run"] != run:
            old, _cache["run"], _cache["items"] = _cache["items"], run, {}
            for item in old.values():
                teardown = getattr(item, "teardown", None)
                if teardown is not None:
                    try:
                        teardown()
                    except Exception:  # noqa: BLE001 - best effort, as Beam's teardown
                        pass
        item = _cache["items"].get(key)
    if item is None:
        item = make()
        with _cache_lock:
            _cache["items"].setdefault(key, item)
    return item


def _global(value):
    return WindowedValue(value, 0, (GlobalWindow(),))


class _Outputs(dict):
    """Receivers by tag, appending each output's value to the current bundle's list of its tag."""

    class _Into(Receiver):
        def __init__(self, outputs, tag):
            self.outputs, self.tag = outputs, tag

        def receive(self, windowed_value):
            self.outputs.current[self.tag].append(windowed_value.value)

    def __init__(self, tags):
        super().__init__()
        self.current = None
        for tag in tags:
            self[tag] = self._Into(self, tag)

    def __missing__(self, tag):
        raise ValueError(f"the DoFn emitted to the undeclared output {tag!r}")


class _Step:
    """A ParDo set up on one worker thread: its DoFnRunner, reused for every bundle of the run."""

    def __init__(self, spec: bytes, side_values):
        fn, args, kwargs, side_specs, tags = pickler.loads(spec)
        side_maps = [SideInputMap(view, options, [_global(v) for v in values])
                     for (view, options), values in zip(side_specs, side_values)]
        self.outputs = _Outputs(tags)
        self.tags = tags
        self.runner = DoFnRunner(fn, args, kwargs, side_maps, Windowing(GlobalWindows()), self.outputs,
                                 step_name=getattr(fn, "__class__", type(fn)).__name__)
        self.runner.setup()

    def teardown(self):
        self.runner.teardown()

    def bundle(self, elements):
        self.outputs.current = {tag: [] for tag in self.tags}
        self.runner.start()
        for element in elements:
            self.runner.process(_global(element))
        self.runner.finish()
        outputs, self.outputs.current = self.outputs.current, None
        return outputs


def run_pardo(run: str, step: str, spec: bytes, single: bool, elements, *side_values):
    """One bundle of a ParDo: its outputs ({tag: elements}, or the main output's list)."""
    key = (step, threading.get_ident())
    outputs = _cached(run, key, lambda: _Step(spec, side_values)).bundle(elements)
    return outputs[None] if single else outputs


def pick(outputs: dict, tag):
    return outputs[tag]


def impulse():
    return [b""]


def concat(parts):
    return [element for part in parts for element in part]


def count(elements) -> int:
    return len(elements)


def stable_hash(key) -> int:
    """The same number in every process (``hash`` of a str is salted per process)."""
    if isinstance(key, str):
        return zlib.crc32(key.encode("utf-8", "surrogatepass"))
    if isinstance(key, bytes):
        return zlib.crc32(key)
    if isinstance(key, bool) or key is None:
        return int(bool(key))
    if isinstance(key, int):
        return key & 0xFFFFFFFF
    if isinstance(key, tuple):
        return zlib.crc32(repr(tuple(stable_hash(part) for part in key)).encode())
    return zlib.crc32(pickle.dumps(key, protocol=4))


def split_by_key(elements, partitions: int):
    buckets = [[] for _ in range(partitions)]
    for element in elements:
        buckets[stable_hash(element[0]) % partitions].append(element)
    return buckets


def split_round_robin(elements, partitions: int, start: int):
    buckets = [[] for _ in range(partitions)]
    for offset, element in enumerate(elements):
        buckets[(start + offset) % partitions].append(element)
    return buckets


def group(parts):
    grouped = defaultdict(list)
    for part in parts:
        for key, value in part:
            grouped[key].append(value)
    return list(grouped.items())


class _Combine:
    """A CombineFn set up on one worker thread."""

    def __init__(self, spec: bytes):
        self.fn, self.args, self.kwargs = pickler.loads(spec)
        self.fn.setup(*self.args, **self.kwargs)

    def teardown(self):
        self.fn.teardown(*self.args, **self.kwargs)


def combine_split(run: str, step: str, spec: bytes, elements, partitions: int):
    """Combines a partition's values per key (combiner lifting), then splits the accumulators."""
    combine = _cached(run, (step, threading.get_ident()), lambda: _Combine(spec))
    fn, args, kwargs = combine.fn, combine.args, combine.kwargs
    accumulators = {}
    for key, value in elements:
        accumulator = accumulators.get(key)
        if accumulator is None and key not in accumulators:
            accumulator = fn.create_accumulator(*args, **kwargs)
        accumulators[key] = fn.add_input(accumulator, value, *args, **kwargs)
    return split_by_key(accumulators.items(), partitions)


def combine_merge(run: str, step: str, spec: bytes, parts):
    combine = _cached(run, (step, threading.get_ident()), lambda: _Combine(spec))
    fn, args, kwargs = combine.fn, combine.args, combine.kwargs
    return [(key, fn.extract_output(fn.merge_accumulators(accumulators, *args, **kwargs), *args, **kwargs))
            for key, accumulators in group(parts)]


# --- on the client: translation ----------------------------------------------------------------

def _is_key(expression) -> bool:
    return isinstance(expression, tuple) and len(expression) == 2 and isinstance(expression[0], str) \
        and isinstance(expression[1], int)


class Translation(PipelineVisitor):
    """Beam transforms -> one Dask graph. Each PCollection maps to its partitions: Dask keys or
    task expressions that a consumer nests into its own task (fusion)."""

    def __init__(self, partitions: int):
        self.partitions = partitions
        self.run = uuid.uuid4().hex
        self.graph: dict = {}
        self.pcolls: dict = {}        # PCollection -> [expression per partition]
        self.uses: dict = defaultdict(int)
        self.side_keys: dict = {}
        self.skip = None              # a composite translated as a whole
        self.names = itertools.count()

    # the pass that counts consumers ----------------------------------------------------------
    def count_uses(self, pipeline):
        translation = self

        class Counter(PipelineVisitor):
            def __init__(self):
                self.skip = None

            def enter_composite_transform(self, node):
                if self.skip is None and translation.whole(node):
                    self.skip = node
                    self.visit_transform(node)

            def leave_composite_transform(self, node):
                if self.skip is node:
                    self.skip = None

            def visit_transform(self, node):
                if self.skip is not None and self.skip is not node:
                    return
                for value in node.inputs:
                    translation.uses[value] += 1
                for side in node.side_inputs:
                    translation.uses[side.pvalue] += 1

        pipeline.visit(Counter())

    @staticmethod
    def whole(node) -> bool:
        return isinstance(node.transform, (beam.Reshuffle, beam.CombinePerKey))

    # helpers -----------------------------------------------------------------------------------
    def name(self, node, what: str) -> str:
        label = node.full_label.replace("/", "|")[-60:]
        return f"{what}-{label}-{next(self.names)}-{self.run[:8]}"

    def materialize(self, expressions, name: str) -> list:
        keys = []
        for index, expression in enumerate(expressions):
            if _is_key(expression):
                keys.append(expression)
                continue
            self.graph[(name, index)] = expression
            keys.append((name, index))
        return keys

    def output(self, node, pcoll, expressions, name):
        """Keeps a PCollection lazy for its one consumer, else makes it tasks of its own."""
        if self.uses[pcoll] != 1:
            expressions = self.materialize(expressions, name)
        self.pcolls[pcoll] = expressions

    def data(self, name: str, value) -> tuple:
        key = (name, 0)
        self.graph[key] = value
        return key

    def side_input(self, side) -> tuple:
        pcoll = side.pvalue
        if pcoll not in self.side_keys:
            parts = self.materialize(self.pcolls[pcoll], f"side-parts-{id(pcoll)}-{self.run[:8]}")
            key = (f"side-{id(pcoll)}-{self.run[:8]}", 0)
            self.graph[key] = (concat, list(parts))
            self.side_keys[pcoll] = key
        return self.side_keys[pcoll]

    @staticmethod
    def check_window(node):
        for value in node.inputs:
            windowing = getattr(value, "windowing", None)
            if windowing is not None and not isinstance(windowing.windowfn, GlobalWindows):
                raise NotImplementedError(
                    f"{node.full_label}: the Dask runner supports the global window only, not "
                    f"{type(windowing.windowfn).__name__}")

    # the visit ---------------------------------------------------------------------------------
    def enter_composite_transform(self, node):
        if self.skip is None and self.whole(node):
            self.skip = node
            self.check_window(node)
            if isinstance(node.transform, beam.Reshuffle):
                self.reshuffle(node)
            else:
                self.combine_per_key(node)

    def leave_composite_transform(self, node):
        if self.skip is node:
            self.skip = None

    def visit_transform(self, node):
        if self.skip is not None:
            return
        self.check_window(node)
        transform = node.transform
        if isinstance(transform, beam.Impulse):
            self.output(node, node.outputs[None], [(impulse,)], self.name(node, "impulse"))
        elif isinstance(transform, beam.ParDo):
            self.pardo(node)
        elif isinstance(transform, beam.GroupByKey):
            self.group_by_key(node)
        elif isinstance(transform, beam.Flatten):
            parts = [expression for value in node.inputs for expression in self.pcolls[value]]
            self.output(node, node.outputs[None], parts, self.name(node, "flatten"))
        else:
            raise NotImplementedError(f"{node.full_label}: the Dask runner cannot run {type(transform).__name__}")

    def only_input(self, node):
        (value,) = [v for v in node.inputs if not isinstance(v, pvalue.PBegin)]
        return value

    def pardo(self, node):
        transform = node.transform
        value = self.only_input(node)
        args, kwargs = transform.args, transform.kwargs  # side inputs as placeholders
        side_specs = [(type(side), side._view_options()) for side in node.side_inputs]
        side_keys = [self.side_input(side) for side in node.side_inputs]
        tags = [None, *(tag for tag in node.outputs if tag is not None)]
        single = len(tags) == 1
        spec_key = self.data(self.name(node, "spec"),
                             pickler.dumps((transform.fn, list(args), dict(kwargs), side_specs, tags)))
        step = self.name(node, "pardo")
        results = [(run_pardo, self.run, step, spec_key, single, part, *side_keys)
                   for part in self.pcolls[value]]
        if single:
            self.output(node, node.outputs[None], results, step)
            return
        if sum(self.uses[pcoll] for pcoll in node.outputs.values()) > 1:
            results = self.materialize(results, step)
        for tag, pcoll in node.outputs.items():
            self.output(node, pcoll, [(pick, result, tag) for result in results], f"{step}-{tag}")

    def shuffle(self, node, split_parts, merge, name):
        """Each input partition split into buckets, bucket j of every split merged into output j."""
        splits = self.materialize(split_parts, f"{name}-split")
        outputs = []
        for index in range(self.partitions):
            buckets = [(pick, split, index) for split in splits]
            outputs.append((*merge, buckets) if isinstance(merge, tuple) else (merge, buckets))
        return outputs

    def group_by_key(self, node):
        name = self.name(node, "gbk")
        parts = self.pcolls[self.only_input(node)]
        outputs = self.shuffle(node, [(split_by_key, part, self.partitions) for part in parts], group, name)
        self.output(node, node.outputs[None], outputs, name)

    def reshuffle(self, node):
        name = self.name(node, "reshuffle")
        parts = self.pcolls[self.only_input(node)]
        splits = [(split_round_robin, part, self.partitions, index) for index, part in enumerate(parts)]
        outputs = self.shuffle(node, splits, concat, name)
        self.output(node, node.outputs[None], outputs, name)

    def combine_per_key(self, node):
        transform = node.transform
        if any(isinstance(arg, pvalue.AsSideInput) for arg in [*transform.args, *transform.kwargs.values()]):
            raise NotImplementedError(f"{node.full_label}: side inputs of a CombineFn are not supported on Dask")
        name = self.name(node, "combine")
        spec_key = self.data(f"{name}-spec", pickler.dumps(
            (CombineFn.maybe_from_callable(transform.fn), list(transform.args), dict(transform.kwargs))))
        parts = self.pcolls[self.only_input(node)]
        splits = [(combine_split, self.run, name, spec_key, part, self.partitions) for part in parts]
        outputs = self.shuffle(node, splits, (combine_merge, self.run, name, spec_key), name)
        self.output(node, node.outputs[None], outputs, name)

    def leaves(self) -> list:
        """A count task per partition of every PCollection that nothing consumes."""
        keys = []
        for pcoll, expressions in self.pcolls.items():
            if self.uses[pcoll] == 0:
                for index, expression in enumerate(expressions):
                    key = (f"leaf-{id(pcoll)}-{self.run[:8]}", index)
                    self.graph[key] = (count, expression)
                    keys.append(key)
        return keys


def translate(pipeline, partitions: int) -> tuple[dict, list]:
    translation = Translation(partitions)
    translation.count_uses(pipeline)
    pipeline.visit(translation)
    return translation.graph, translation.leaves()


# --- the run -----------------------------------------------------------------------------------

class DaskRunnerError(RuntimeError):
    """The cluster failed the run (no worker left, the scheduler lost); one line."""


def local_cluster(options: DaskClusterOptions):
    from distributed import LocalCluster

    workers = options.dask_workers or os.cpu_count() or 1
    return LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                        dashboard_address=None, memory_limit=options.dask_worker_memory or "auto",
                        silence_logs=logging.CRITICAL)


def connect(options):
    """(client, local cluster or None): the cluster of ``--dask_client_address`` (or
    ``--dask_scheduler_file``), else a local one started for this run."""
    from distributed import Client

    quiet_dask()
    dask = options.view_as(DaskOptions)
    timeout = dask.timeout if isinstance(dask.timeout, int) else 30
    if dask.address or dask.scheduler_file:
        where = dask.address or f"the scheduler file {dask.scheduler_file}"
        deadline = time.monotonic() + timeout
        while not dask.address and not os.path.exists(dask.scheduler_file):  # Dask would wait for ever
            if time.monotonic() > deadline:
                raise DaskRunnerError(f"no Dask scheduler file at {dask.scheduler_file} after {timeout} s")
            time.sleep(0.2)
        try:
            return Client(dask.address, scheduler_file=dask.scheduler_file, timeout=timeout, set_as_default=False), None
        except (OSError, TimeoutError) as exc:  # refused, unknown host, no answer, no scheduler file
            raise DaskRunnerError(f"cannot reach the Dask scheduler at {where} within {timeout} s "
                                  f"({type(exc).__name__})") from None
    cluster = local_cluster(options.view_as(DaskClusterOptions))
    return Client(cluster, set_as_default=False), cluster


def check_scheduler(options) -> None:
    """Before the output folder is touched: a named cluster that cannot be reached fails the run
    in one line (``DaskRunnerError``), not after the output was prepared."""
    dask = options.view_as(DaskOptions)
    if dask.address or dask.scheduler_file:
        client, _ = connect(options)
        client.close()


def versions() -> dict:
    """What must be the same on the launcher and every worker: the graph holds pickled DoFns."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for package in ("apache-beam", "dask", "distributed", "dicom-fhir-beam"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    return found


def check_versions(client) -> None:
    mine = versions()
    for worker, theirs in client.run(versions).items():
        if theirs != mine:
            different = ", ".join(f"{name} {theirs[name]} (here {mine[name]})" for name in mine if theirs.get(name) != mine[name])
            raise DaskRunnerError(f"Dask worker {worker} runs other versions than the launcher: {different}")


def quiet_dask() -> None:
    """The run's error is one line: the client's own logs of a lost scheduler or worker (which
    distributed's logging config sets per module) stay off the console."""
    for name in list(logging.root.manager.loggerDict):
        if name.split(".")[0] in ("distributed", "tornado", "asyncio"):
            logging.getLogger(name).setLevel(logging.CRITICAL)


class DaskRunnerResult(PipelineResult):
    def __init__(self, client, cluster, futures):
        super().__init__(PipelineState.RUNNING)
        self.client, self.cluster, self.futures = client, cluster, futures

    def wait_until_finish(self, duration=None):
        try:
            self._wait()
            self._state = PipelineState.DONE
        except BaseException:
            self._state = PipelineState.FAILED
            raise
        finally:
            self.close()
        return self._state

    def _wait(self):
        """Until every leaf is done; the first failed task's exception is raised. A cluster that
        cannot go on (no worker, or no scheduler, for ``NO_WORKER_GRACE`` s) fails the run; a
        worker lost meanwhile is the scheduler's to recover from (it recomputes what was lost)."""
        pending = list(self.futures)
        unhealthy_since, problem = None, None
        while pending:
            time.sleep(0.2)
            done = [future for future in pending if future.status != "pending"]
            pending = [future for future in pending if future.status == "pending"]
            for future in done:
                if future.status == "error":
                    raise future.exception()
                if future.status == "cancelled":
                    raise DaskRunnerError("lost the Dask scheduler: it cancelled the run's tasks")
            if not pending:
                break
            problem = self._problem()
            if problem is None:
                unhealthy_since = None
            elif unhealthy_since is None:
                unhealthy_since = time.monotonic()
            elif time.monotonic() - unhealthy_since > NO_WORKER_GRACE:
                raise DaskRunnerError(f"{problem} for {NO_WORKER_GRACE:.0f} s")

    def _problem(self) -> str | None:
        if self.client.status != "running":
            return "lost the Dask scheduler"
        try:
            workers = self.client.scheduler_info(n_workers=-1)["workers"]
        except Exception:  # noqa: BLE001 - the scheduler is going away
            return "lost the Dask scheduler"
        return None if workers else "no Dask worker left"

    def close(self):
        import contextlib

        with contextlib.suppress(Exception):
            self.client.cancel(self.futures)
        with contextlib.suppress(Exception):
            self.client.close(timeout=10)
        if self.cluster is not None:
            with contextlib.suppress(Exception):
                self.cluster.close(timeout=20)

    def cancel(self):
        self.close()
        self._state = PipelineState.CANCELLED
        return self._state

    def metrics(self):
        raise NotImplementedError("the Dask runner reports no Beam metrics (summary.json holds the counts)")


class DaskRunner(PipelineRunner):
    """Executes a batch pipeline on a Dask cluster, one fused task graph."""

    def is_fnapi_compatible(self):
        return False

    def run_pipeline(self, pipeline, options):
        client, cluster = connect(options)
        try:
            check_versions(client)
            threads = sum(client.nthreads().values()) or 1
            partitions = options.view_as(DaskOptions).npartitions or PARTITIONS_PER_THREAD * threads
            graph, leaves = translate(pipeline, partitions)
            futures = client.get(graph, leaves, sync=False)
        except BaseException:
            DaskRunnerResult(client, cluster, []).close()
            raise
        return DaskRunnerResult(client, cluster, futures)
