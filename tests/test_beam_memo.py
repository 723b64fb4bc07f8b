"""Start-up cuts of Beam's fixed cost: its argument introspection memoized (run/beam_memo.py), the
same answers as Beam's own; type inference at construction skipped on the in-process runner only."""
import functools
import shutil

import apache_beam as beam
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms import core

from beam_pipeline.run import beam_memo


class _Stateful(beam.DoFn):
    COUNT = beam.transforms.userstate.CombiningValueStateSpec("count", sum)

    def process(self, element, count=beam.DoFn.StateParam(COUNT), window=beam.DoFn.WindowParam):
        yield element


def _plain(a, b=2, *rest, c=3, **more):
    return a


def _samples():
    fn = _Stateful()
    return [_plain, lambda x, y=1: x, fn.process, fn.setup, _Stateful.process, len, str.strip,
            functools.partial(_plain, 1), beam.Map(str).fn.process]


def test_the_memo_gives_beams_answers_and_fresh_lists():
    assert beam_memo.install()
    memoized = core.get_function_args_defaults
    assert memoized.memoized and beam_memo.install()  # installed once: not wrapped twice
    assert core.get_function_args_defaults is memoized
    for f in _samples():
        expected = memoized.original(f)
        first = memoized(f)
        first[0].append("mutated")
        first[1].append("mutated")
        assert memoized(f) == expected, f  # a caller's change does not reach the next caller


def test_beam_still_finds_state_and_side_parameters_through_the_memo():
    beam_memo.install()
    state_specs, timer_specs = beam.transforms.userstate.get_dofn_specs(_Stateful())
    assert [spec.name for spec in state_specs] == ["count"] and not timer_specs
    with beam.Pipeline(runner=FnApiRunner()) as p:
        out = p | beam.Create([("k", 1), ("k", 2)]) | beam.ParDo(_Stateful())
        assert_that(out, equal_to([("k", 1), ("k", 2)]))


def test_only_the_in_process_runner_skips_type_inference_at_construction():
    from apache_beam.options.pipeline_options import TypeOptions

    from beam_pipeline.run.cli import new_pipeline

    in_process = new_pipeline(["--direct_num_workers", "1"])
    prism = new_pipeline(["--runner", "PrismRunner"])
    for unrun in (in_process, prism):  # Beam makes a temp folder per Pipeline and removes it when it runs
        shutil.rmtree(unrun.local_tempdir, ignore_errors=True)
    assert in_process._options.view_as(TypeOptions).pipeline_type_check is False
    assert prism._options.view_as(TypeOptions).pipeline_type_check is True
