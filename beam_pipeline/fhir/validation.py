"""Validation by shape: pydantic checks each resource structure once per worker, then only values.

The fhir.resources models decide a resource's validity from its structure (which elements are
present, nested how, as lists of which length, with leaf values of which Python type, and the
``resourceType`` of each resource) and from each primitive value checked by its own FHIR type
(id, code, dateTime...). Their model-level checks (required elements, one of many ``value[x]``,
no null in a list of complex elements) look at presence only. So once pydantic has accepted one
resource of a structure, another of the same structure is valid if each of its primitive values
passes the validator of its field's type, which costs microseconds instead of a model walk.

Anything this walk cannot vouch for (a key the model lacks, a polymorphic ``Resource`` field, a
value that fails its type) goes to pydantic itself, so the verdict and its message are pydantic's.
Small studies of alike scanners repeat a handful of structures: each is modelled once per worker.
A structure that keeps coming is compiled into a check of its own (``_compile``: straight-line code
that tests each key, type and list length the walk would find and checks each value as the walk
would), tried before the generic walk; anything it does not match goes the walk's way. It skips a
list that passed whole at the same place while it is the same object, and a resource that passed
whole (a scanner's Device, built once per worker): resources are not changed once built, and the
extension lists and other parts ``build.MappedParts`` shares between studies repeat.
"""
from __future__ import annotations

import datetime
import re
import types
import typing

MAX_SHAPES = 4096     # structures kept per worker (cleared when full: correctness does not depend on it)
MAX_VALUES = 1 << 14  # checked primitive values kept per worker (a few MB at most)
COMPILE_AFTER = 32    # a structure vouched for this often is compiled (compiling costs some 200 walks' time)
MAX_COMPILED = 8      # compiled structures tried per resource type (most recently matched first)
MAX_COMPILED_NODES = 600  # a larger structure (a study of many series) is left to the walk
MAX_PASSED = 64       # resources kept per compiled check as passed whole (by id)
_MODEL, _PRIMITIVE, _UNKNOWN = "model", "primitive", "unknown"
_LATER = "model not imported yet"  # fhir_core imports a field's model on demand: only for fields met
_NOTHING = object()  # no value has passed at this place yet
# Core schemas checked in Rust alone (constraints, no Python validator function): a value's verdict
# costs less than a cache lookup (``isinstance_python`` is "validate_python raises no
# ValidationError", and nothing else can raise here). id, string, code, uri, unsignedInt, boolean...
PLAIN_SCHEMAS = frozenset({"str", "int", "bool", "float"})


def shape(value, memo: dict):
    """The structure of a JSON value without its values, but with each ``resourceType``.

    ``memo`` maps id() of lists already seen to their shape: the instances of a series share their
    detail extension list, so each list is walked once (valid while the caller holds the value).
    """
    kind = type(value)
    if kind is dict:
        return tuple([(key, item if key == "resourceType" else shape(item, memo)) for key, item in value.items()])
    if kind is list:
        found = memo.get(id(value))
        if found is None:
            found = memo[id(value)] = tuple([shape(item, memo) for item in value])
        return found
    return kind


def same_shape(one, other) -> bool:
    """``shape(one) == shape(other)``, without building either: the same object has the same
    shape, so the shared parts of alike instances (their detail extension lists) are not walked."""
    if one is other:
        return True
    kind = type(one)
    if kind is not type(other):
        return False
    if kind is dict:
        if len(one) != len(other):
            return False
        for (key, item), (other_key, other_item) in zip(one.items(), other.items()):
            if key != other_key:
                return False
            if item is other_item:
                continue
            if key == "resourceType":
                if item != other_item:
                    return False
                continue
            item_kind = type(item)  # a leaf's shape is its type: no call for it
            if item_kind is not type(other_item):
                return False
            if (item_kind is dict or item_kind is list) and not same_shape(item, other_item):
                return False
        return True
    if kind is list:
        return len(one) == len(other) and all(map(same_shape, one, other))
    return True


# A FHIR dateTime as the builder writes it (a study's start, unique to the study): a day, or a
# day with a time to the second, 1-6 digits of fraction and an offset. fhir_core checks this
# pattern, then pydantic parses it; text of this form is valid when its day is a real one.
_DATETIME = re.compile(
    r"(?:[0-9]{3}[1-9]|[0-9]{2}[1-9]0|[0-9][1-9]00|[1-9]000)-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12][0-9]|3[01])"
    r"(?:T(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\.[0-9]{1,6})?[+-](?:(?:0[0-9]|1[0-3]):[0-5][0-9]|14:00))?")


def fhir_datetime_ok(value) -> bool:
    """True when ``value`` surely passes fhir_core's DateTime (tests compare it with pydantic over
    many values); False when pydantic must tell (a leap second, ``Z``, a partial date...)."""
    if type(value) is not str or not value.isascii() or _DATETIME.fullmatch(value) is None:
        return False
    if value[8:10] <= "28":
        return True
    try:
        datetime.date.fromisoformat(value[:10])
    except ValueError:
        return False
    return True


def _remembering(check):
    """``check`` that answers at once for the value it passed last (held, so the same object is
    the same value): a study's start comes again as its series' start, the same string."""
    passed = [None]

    def remembered(value) -> bool:
        if value is passed[0]:
            return True
        if check(value):
            passed[0] = value
            return True
        return False
    return remembered


def _is_fhir_datetime(annotation) -> bool:
    from fhir_core.types import DateTime

    args = typing.get_args(annotation) if typing.get_origin(annotation) is typing.Annotated else ()
    return bool(args) and args[0] is datetime.datetime and any(type(meta) is DateTime for meta in args[1:])


def _field_type(annotation):
    """(list or not, the element's annotation) without the Optional around it."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        if len(args) != 1:
            return False, None
        annotation = args[0]
    if typing.get_origin(annotation) in (list, typing.List):
        (item,) = typing.get_args(annotation)
        return True, item
    return False, annotation


class ShapeVerdicts:
    """Per worker: the structures pydantic accepted, and the primitive values already checked."""

    def __init__(self):
        from fhir_core.types import FhirBase, FhirElementOrResourceBase  # imported by workers, not the launcher
        from pydantic import TypeAdapter, ValidationError

        self._type_adapter, self._invalid = TypeAdapter, (ValidationError, ValueError, TypeError)
        self._fhir_base, self._polymorphic = FhirBase, FhirElementOrResourceBase
        self.accepted: set = set()
        self.values: dict = {}
        self.fields: dict = {}    # model class -> {JSON key: (kind, target, is list)}
        self.adapters: dict = {}  # primitive annotation -> TypeAdapter
        self.plain: dict = {}     # id() of a kept TypeAdapter of a plain schema -> its isinstance_python
        self.fast: dict = {}      # id() of a kept TypeAdapter -> a check that says True for most valid values
        self.compiled: dict = {}  # resource type -> [(key, check)], most recently matched first
        self.hits: dict = {}      # key -> times vouched by the walk (until compiled)
        self.retired: set = set()  # keys compiled once and no longer among the MAX_COMPILED
        self.compile_after = COMPILE_AFTER

    def vouches(self, model, resource_type: str, resource: dict) -> tuple[bool, tuple | None]:
        """(whether the resource is valid without asking pydantic, its key for ``accept``; None when
        it has parts this walk cannot vouch for)."""
        checks = self.compiled.get(resource_type)
        if checks:
            for index, (key, check) in enumerate(checks):
                refused = False
                for probe in check.probes:
                    if probe(resource):  # of another compiled structure: told apart where the two differ
                        refused = True
                        break
                if refused:
                    continue
                try:
                    verdict = check(resource)
                except TypeError:  # an unhashable value: the walk's way
                    break
                if verdict is not None:
                    if index:
                        checks.insert(0, checks.pop(index))
                    return verdict, key  # compiled from an accepted structure (they are cleared together)
        values: list = []
        walked = self._walk(model, resource, values, {})
        if walked is None:
            return False, None
        key = (resource_type, walked)
        if key not in self.accepted:
            return False, key
        self._count(model, key)
        return all(self._value_ok(adapter, value) for adapter, value in values), key

    def _count(self, model, key: tuple) -> None:
        """Compile a structure once the walk has vouched for it ``compile_after`` times, once."""
        hits = self.hits.get(key, 0) + 1
        if hits < self.compile_after:
            if len(self.hits) >= MAX_SHAPES:
                self.hits.clear()
            self.hits[key] = hits
            return
        self.hits.pop(key, None)
        if key in self.retired:  # compiled once and crowded out since: compiling costs a few ms
            return
        check = self._compile(model, key[1])
        if check is not None:
            checks = self.compiled.setdefault(key[0], [])
            for other, other_check in checks:  # each tells the other apart where they first differ
                self._probe(check, model, key[1], other[1])
                self._probe(other_check, model, other[1], key[1])
            checks.insert(0, (key, check))
            if len(self.retired) >= MAX_SHAPES:
                self.retired.clear()
            self.retired.update(old for old, _ in checks[MAX_COMPILED:])
            del checks[MAX_COMPILED:]

    def _probe(self, check, model, walked: tuple, other: tuple) -> None:
        """Give ``check`` (of the shape ``walked``) a probe against the shape ``other``: at the
        first object whose keys, or list whose length, differ between the two, a resource without
        ``walked``'s keys or length there (or without that place) is not of ``walked``, so the
        check would return None. A failing check costs most of a passing one; a probe, a few
        lookups. (Shapes that first differ in a leaf's type get no probe.)"""
        found = self._divergence(model, walked, other, ())
        if found is None:
            return
        path, expected = found

        def probe(resource) -> bool:
            node = resource
            try:
                for step in path:
                    node = node[step]
                return (len(node) if type(expected) is int else tuple(node)) != expected
            except (KeyError, IndexError, TypeError):
                return True
        check.probes.append(probe)
        del check.probes[:-MAX_COMPILED]  # the newest: a long run compiles many, keeps MAX_COMPILED

    def _divergence(self, model, mine: tuple, other: tuple, path: tuple):
        """(path, keys tuple or list length of ``mine`` there) at the first object or list where
        the shapes ``mine`` and ``other`` of ``model`` differ in keys or length; None if none does."""
        keys = tuple(key for key, _ in mine)
        if keys != tuple(key for key, _ in other):
            return path, keys
        fields = self.fields.get(model)
        if fields is None:
            fields = self.fields[model] = self._fields_of(model)
        for (key, part), (_, other_part) in zip(mine, other):
            if key == "resourceType" or part == other_part:
                continue
            kind, target, many = self._spec(fields, key)
            if many and len(part) != len(other_part):
                return path + (key,), len(part)
            if kind is not _MODEL:
                continue
            pairs = zip(part, other_part) if many else [(part, other_part)]
            for index, (mine_item, other_item) in enumerate(pairs):
                if mine_item != other_item:
                    found = self._divergence(target, mine_item, other_item, path + (key, index) if many else path + (key,))
                    if found is not None:
                        return found
        return None

    def _compile(self, model, walked: tuple):
        """A function of a resource: None unless ``_walk`` would give it the shape ``walked``, up to
        the order of an object's keys (pydantic does not look at it); then whether each of its
        primitive values passes (``_value_ok``). None for a large structure."""
        lines: list = []
        consts: dict = {}
        passed: list = []
        same: list = []

        def const(value) -> str:
            name = f"c{len(consts)}"
            consts[name] = value
            return name

        def leaf(var: str, adapter, kind, indent: str) -> None:
            # last[i]: the value that passed here last (most values repeat study after study): one
            # of the same type that is equal passes too, as it does in ``self.values``.
            slot = len(passed)
            passed.append(_NOTHING)  # not None: a None that is there must be checked too
            # The same object as last time (the constant strings) has the type it had then.
            lines.append(f"{indent}if {var} is not last[{slot}]:")
            lines.append(f"{indent} if type({var}) is not {const(kind)}: return None")
            lines.append(f"{indent} if {var} != last[{slot}]:")
            plain = self.plain.get(id(adapter))
            fast = self.fast.get(id(adapter))
            if plain is not None:  # asked directly: cheaper than the cache, which unique values would churn
                lines.append(f"{indent}  if {const(plain)}({var}): last[{slot}] = {var}")
            elif fast is not None:  # a study's start: unique, mostly vouched for by its pattern alone
                lines.append(f"{indent}  if {const(fast)}({var}) or slow({const(adapter)}, {var}): last[{slot}] = {var}")
            else:
                lines.append(f"{indent}  k = get(({id(adapter)}, {const(kind)}, {var}))")
                lines.append(f"{indent}  if k is None: k = slow({const(adapter)}, {var})")
                lines.append(f"{indent}  if k: last[{slot}] = {var}")
            lines.append(f"{indent}  else: bad = True")

        def model_part(target, shape: tuple, var: str, indent: str = " ") -> None:
            fields = self.fields.get(target)
            if fields is None:
                fields = self.fields[target] = self._fields_of(target)
            # as many keys, each looked up below (a missing one: not this structure); their order
            # does not matter to pydantic
            lines.append(f"{indent}if type({var}) is not dict or len({var}) != {len(shape)}: return None")
            for key, part in shape:
                item = f"v{len(lines)}"
                lines.append(f"{indent}{item} = {var}[{const(key)}]")
                if key == "resourceType":
                    lines.append(f"{indent}if type({item}) is not str or {item} != {const(part)}: return None")
                    continue
                kind, target_of, many = self._spec(fields, key)
                if not many:
                    if kind is _PRIMITIVE:
                        leaf(item, target_of, part, indent)
                    else:
                        model_part(target_of, part, item, indent)
                    continue
                lines.append(f"{indent}if type({item}) is not list or len({item}) != {len(part)}: return None")
                # same[j]: the list that passed here last, whole. Resources are not changed once
                # built, and the extension lists ``MappedParts`` shares between studies are the same
                # objects study after study: such a list is not checked again.
                slot = len(same)
                same.append(None)
                inner = indent + " "
                lines.append(f"{indent}if {item} is not same[{slot}]:")
                lines.append(f"{inner}b{slot} = bad")
                lines.append(f"{inner}bad = False")
                for index, element in enumerate(part):
                    name = f"{item}_{index}"
                    lines.append(f"{inner}{name} = {item}[{index}]")
                    if kind is _PRIMITIVE:
                        leaf(name, target_of, element, inner)
                    else:
                        model_part(target_of, element, name, inner)
                lines.append(f"{inner}if not bad: same[{slot}] = {item}")
                lines.append(f"{inner}bad = bad or b{slot}")
                if len(lines) > 8 * MAX_COMPILED_NODES:
                    raise OverflowError

        # The resources that passed whole, by id (kept, so their ids are not reused): the Devices
        # of a worker's scanners, each built once, come study after study in any order.
        whole = const({})
        try:
            model_part(model, walked, "data", "  ")
        except OverflowError:
            return None
        source = (f"def check(data):\n if {whole}.get(id(data)) is data: return True\n bad = False\n try:\n"
                  + "\n".join(lines) + "\n except KeyError:\n  return None  # an object with other keys"
                  + f"\n if not bad:\n  if len({whole}) >= {MAX_PASSED}: {whole}.clear()"
                  + f"\n  {whole}[id(data)] = data\n return not bad\n")
        namespace = {**consts, "get": self.values.get, "slow": self._value_ok, "last": passed, "same": same}
        exec(compile(source, "<validation.ShapeVerdicts._compile>", "exec"), namespace)
        check = namespace["check"]
        check.probes = []  # see ``_probe``
        return check

    def accept(self, key: tuple | None) -> None:
        if key is None:
            return
        if len(self.accepted) >= MAX_SHAPES:
            self.accepted.clear()
            self.compiled.clear()  # each was compiled from an accepted structure: they go together
        self.accepted.add(key)

    def _walk(self, model, data: dict, values: list, memo: dict):
        """The shape of ``data`` (as ``shape`` gives it) while collecting (type adapter, value) of
        its primitives; None for a part the model does not declare plainly. A list already walked
        in this call (the instances of a series share their detail extensions) is walked once."""
        fields = self.fields.get(model)
        if fields is None:
            fields = self.fields[model] = self._fields_of(model)
        parts = []
        for key, value in data.items():
            if key == "resourceType":
                parts.append((key, value))
                continue
            spec = fields.get(key)
            if spec is None:
                return None
            kind, target, many = spec
            if kind is _LATER:
                kind, target, many = self._spec(fields, key)
            if not many:
                if kind is _PRIMITIVE:
                    values.append((target, value))
                    parts.append((key, type(value)))
                    continue
                if kind is not _MODEL or type(value) is not dict:
                    return None
                found = self._walk(target, value, values, memo)
            elif type(value) is not list:
                return None
            else:
                seen = (id(value), target)
                found = memo.get(seen)
                if found is None:
                    found = memo[seen] = self._items(kind, target, value, values, memo)
            if found is None:
                return None
            parts.append((key, found))
        return tuple(parts)

    def _items(self, kind, target, items: list, values: list, memo: dict):
        if kind is _PRIMITIVE:
            values.extend((target, item) for item in items)
            return tuple([type(item) for item in items])
        if kind is not _MODEL:
            return None
        shapes = []
        for item in items:
            found = self._walk(target, item, values, memo) if type(item) is dict else None
            if found is None:
                return None
            shapes.append(found)
        return tuple(shapes)

    def _value_ok(self, adapter, value) -> bool:
        plain = self.plain.get(id(adapter))
        if plain is not None:
            return plain(value)
        fast = self.fast.get(id(adapter))
        if fast is not None and fast(value):
            return True
        try:
            key = (id(adapter), type(value), value)
            known = self.values.get(key)
        except TypeError:  # not hashable: not a primitive value
            return False
        if known is None:
            try:
                adapter.validate_python(value)
                known = True
            except self._invalid:
                known = False
            if len(self.values) >= MAX_VALUES:
                self.values.clear()
            self.values[key] = known
        return known

    def _fields_of(self, model) -> dict:
        fields = {}
        for name, info in model.model_fields.items():
            many, item = _field_type(info.annotation)
            if item is None:
                spec = (_UNKNOWN, None, many)
            elif isinstance(item, type) and issubclass(item, self._fhir_base):
                polymorphic = issubclass(item, self._polymorphic)
                spec = (_UNKNOWN, None, many) if polymorphic else (_LATER, item, many)
            else:
                spec = (_PRIMITIVE, self._adapter(item), many)
            fields[info.alias or name] = spec
        return fields

    @staticmethod
    def _spec(fields: dict, key: str) -> tuple:
        """A field's spec, its model imported the first time the field is met (some 7 ms a model:
        an ImagingStudy declares 40 model fields, a study of ours uses a dozen)."""
        kind, target, many = spec = fields[key]
        if kind is _LATER:
            spec = fields[key] = (_MODEL, target.get_model_klass(), many)
        return spec

    def _adapter(self, annotation):
        try:
            adapter = self.adapters.get(annotation)
        except TypeError:
            return self._type_adapter(annotation)
        if adapter is None:
            adapter = self.adapters[annotation] = self._type_adapter(annotation)
            if adapter.core_schema.get("type") in PLAIN_SCHEMAS:
                self.plain[id(adapter)] = adapter.validator.isinstance_python
            elif _is_fhir_datetime(annotation):
                self.fast[id(adapter)] = _remembering(fhir_datetime_ok)
        return adapter
