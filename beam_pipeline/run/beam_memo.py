"""Beam's argument introspection, memoized per function: a run's start-up spent 0.15 s in it.

Beam reads the signature of every method of every DoFn (``inspect.signature``) each time it
checks a ParDo for state and timers, and again for every bundle the in-process runner sets up:
some 9,400 calls for this pipeline, the same few hundred functions again and again (upstream:
apache/beam#9925, "Memoize expensive introspection functions", never merged). A function's
signature does not change, so ``install`` wraps ``apache_beam.transforms.core.
get_function_args_defaults`` with a cache keyed by the plain function (a bound method by its
function: the bound argument is dropped either way). Anything else (partials, callable objects,
builtins) is passed through. Callers get fresh lists, as from the original.

It changes what Beam computes in no way, only how often; if Beam's function is not where this
expects it (another Beam version), nothing is installed.
"""
from __future__ import annotations

import types

from apache_beam.transforms import core

MAX_FUNCTIONS = 4096  # functions kept (cleared when full; pipelines made of lambdas make new ones)


def install() -> bool:
    """Wrap Beam's ``get_function_args_defaults`` once per process; whether it is wrapped."""
    original = getattr(core, "get_function_args_defaults", None)
    if original is None:
        return False
    if getattr(original, "memoized", False):
        return True
    known: dict = {}

    def get_function_args_defaults(f):
        kind = type(f)
        if kind is types.FunctionType:
            key = f
        elif kind is types.MethodType and type(f.__func__) is types.FunctionType:
            key = (f.__func__,)  # bound: its first parameter is left out, whatever it is bound to
        else:
            return original(f)
        found = known.get(key)
        if found is None:
            if len(known) >= MAX_FUNCTIONS:
                known.clear()
            found = known[key] = original(f)
        return list(found[0]), list(found[1])

    get_function_args_defaults.memoized = True
    get_function_args_defaults.original = original
    core.get_function_args_defaults = get_function_args_defaults
    return True
