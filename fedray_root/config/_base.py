"""The base of every job-spec section: a frozen pydantic model whose errors are `SpecError`s.

Every error names the field by its dotted path and says what is allowed, e.g.
`SpecError: training.rounds: must be an integer >= 1, got 0`. Fields are strict: an integer
field takes only integers (not 5.0, "5" or true), a number field takes integers and floats
(finite only), a boolean only true or false; lists are accepted where a tuple is declared.

A new field is one line in its section, e.g. `max_failures: NonNegInt = 0` with a comment.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Mapping, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError

__all__ = [
    "FieldError", "Fraction", "NonEmptyStr", "NonNegFloat", "NonNegInt", "PosFloat", "PosInt", "Section", "SpecError", "Tuple", "format_error",
]


class SpecError(ValueError):
    """A job spec field is invalid; the message starts with the field's dotted path."""


class FieldError(ValueError):
    """Raised inside a validator: `field` is the path below the validated model ("" for itself)."""

    def __init__(self, field: str, msg: str, value: Any = ...) -> None:
        self.field, self.msg = field, msg + ("" if value is ... else f", got {value!r}")
        super().__init__(self.msg)


# Field types. Strictness comes from the model config; ranges from Field(ge=, gt=, le=, lt=) and
# floats are finite: write `Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]` for others.
PosInt = Annotated[int, Field(ge=1)]
NonNegInt = Annotated[int, Field(ge=0)]
PosFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
NonNegFloat = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Fraction = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]  # [0, 1]
NonEmptyStr = Annotated[str, Field(min_length=1)]


def Tuple(item: Any) -> Any:
    """A tuple field that also takes a list (YAML has no tuples); items stay strict."""
    return Annotated[tuple[item, ...], Field(strict=False)]


class _SectionMeta(type(BaseModel)):
    """Constructing a section raises SpecError (pydantic validates nested sections without this)."""

    def __call__(cls, /, *args: Any, **data: Any):
        try:
            return super().__call__(*args, **data)
        except ValidationError as e:
            raise SpecError(format_error(e, cls, cls._section)) from None


class Section(BaseModel, metaclass=_SectionMeta):
    """A frozen, strict section of the job spec; `_section` is its key in the job spec."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, validate_default=False)
    _section: ClassVar[str] = ""
    # How a number out of range is worded: "bound" (must be > 0), "interval" (must be in (0, inf)),
    # "finite" (must be a finite number > 0); a range bounded on both sides always reads as an interval.
    _number_style: ClassVar[str] = "bound"

    @classmethod
    def model_validate(cls, obj: Any, **kw: Any):  # type: ignore[override]
        try:
            return super().model_validate(obj, **kw)
        except ValidationError as e:
            raise SpecError(format_error(e, cls, cls._section)) from None

    def replace(self, **changes: Any):
        """A copy with `changes`, validated again (unlike `model_copy(update=...)`).

        Raises:
            SpecError: a changed field is invalid.
        """
        return type(self)(**{**{k: getattr(self, k) for k in type(self).model_fields}, **changes})


def _path(parts: tuple) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def _model_at(cls: type, loc: tuple) -> type | None:
    """The model class reached by following `loc` from `cls` (for listing a section's fields)."""
    for part in loc:
        if isinstance(part, int) or cls is None:
            return None
        f = cls.model_fields.get(part)
        if f is None:
            return None
        ann = f.annotation
        cls = next((a for a in (ann, *getattr(ann, "__args__", ()))
                    if isinstance(a, type) and issubclass(a, BaseModel)),
                   None)
    return cls


def _is_int(ann: Any) -> bool:
    """True if `ann` is int, Annotated[int, ...] or int | None."""
    if ann is int:
        return True
    if get_origin(ann) is Annotated:
        return _is_int(get_args(ann)[0])
    args = get_args(ann)
    return bool(args) and get_origin(ann) is not tuple and any(_is_int(a) for a in args if a is not type(None))


def _field_at(cls: type, loc: tuple) -> tuple[type | None, Any, bool]:
    """(owning model, FieldInfo or None, whether loc ends in a tuple index) for an error's loc."""
    item = bool(loc) and isinstance(loc[-1], int)
    field_loc = loc[:-1] if item else loc
    owner = _model_at(cls, field_loc[:-1]) if field_loc else None
    return owner, owner.model_fields.get(field_loc[-1]) if owner is not None else None, item


def _is_int_field(cls: type, loc: tuple) -> bool:
    _, f, item = _field_at(cls, loc)
    if f is None:
        return False
    if item:
        args = get_args(f.annotation)
        return bool(args) and _is_int(args[0])
    return _is_int(f.annotation)


def _message(err: Mapping[str, Any], cls: type, loc: tuple, prefix: str) -> tuple[str, str]:
    """(extra path below loc, message) for one pydantic error, in the job spec's wording."""
    t, v, ctx = err["type"], err.get("input"), err.get("ctx") or {}
    got = f", got {v!r}"
    integer = "an integer " if _is_int_field(cls, loc) else ""
    if t == "value_error" and isinstance(ctx.get("error"), FieldError):
        e = ctx["error"]
        return e.field, e.msg
    if t == "value_error":
        return "", str(ctx.get("error", err["msg"]))
    if t == "extra_forbidden":
        owner = _model_at(cls, loc[:-1])
        names = ", ".join(owner.model_fields) if owner is not None else ""
        where = _path(((prefix,) if prefix else ()) + loc[:-1]) or "job spec"
        return "", f"unknown field; {where} has: {names}"
    if t == "missing":
        return "", "is required"
    if t in ("int_type", "int_parsing", "int_from_float"):
        return "", "must be an integer" + got
    if t in ("float_type", "float_parsing"):
        return "", "must be a finite number" + got
    if t == "finite_number":
        return "", "must be a finite number" + got
    if t in ("bool_type", "bool_parsing"):
        return "", "must be true or false" + got
    if t in ("string_type",):
        return "", "must be a string" + got
    if t in ("tuple_type", "list_type"):
        return "", "must be a list" + got
    if t in ("dict_type", "mapping_type"):
        return "", "must be a mapping" + got
    if t in ("model_type", "model_attributes_type", "dataclass_type"):
        return "", "must be a mapping of fields" + got
    if t == "literal_error":
        return "", f"must be one of {str(ctx.get('expected', '')).replace(chr(39), '')}" + got
    if t in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        return "", _bound_message(t, ctx, cls, loc, integer) + got
    if t == "string_too_short":
        return "", "must be a non-empty string" + got
    if t == "string_pattern_mismatch":
        return "", f"must match {ctx.get('pattern')}" + got
    return "", f"{err['msg']}" + got


_OPS = {"greater_than_equal": (">=", "ge"), "greater_than": (">", "gt"), "less_than_equal": ("<=", "le"),
        "less_than": ("<", "lt")}


def _constraints(ann: Any, out: dict[str, Any]) -> None:
    for m in get_args(ann)[1:] if get_origin(ann) is Annotated else ():
        for c in [m, *getattr(m, "metadata", ())]:
            for k in ("gt", "ge", "lt", "le"):
                if getattr(c, k, None) is not None and k not in out:
                    out[k] = getattr(c, k)
    for a in get_args(ann):
        if get_origin(ann) is not Annotated:
            _constraints(a, out)


def _num(x: Any) -> str:
    return str(int(x)) if isinstance(x, float) and x.is_integer() and abs(x) < 1e15 else str(x)


def _bound_message(t: str, ctx: Mapping[str, Any], cls: type, loc: tuple, integer: str) -> str:
    op, key = _OPS[t]
    owner, f, _ = _field_at(cls, loc)
    if integer or f is None:
        return f"must be {integer}{op} {_num(ctx.get(key))}"
    b: dict[str, Any] = {}
    for m in f.metadata:
        for k in ("gt", "ge", "lt", "le"):
            if getattr(m, k, None) is not None:
                b[k] = getattr(m, k)
    _constraints(f.annotation, b)
    lo, hi = b.get("gt", b.get("ge")), b.get("lt", b.get("le"))
    style = getattr(owner, "_number_style", "bound")
    if (lo is not None and hi is not None) or style == "interval":
        return (f"must be in {'(' if 'gt' in b or lo is None else '['}{'-inf' if lo is None else _num(lo)}, "
                f"{'inf' if hi is None else _num(hi)}{')' if 'lt' in b or hi is None else ']'}")
    return f"must be {'a finite number ' if style == 'finite' else ''}{op} {_num(ctx.get(key))}"


def format_error(e: ValidationError, cls: type, prefix: str = "") -> str:
    """The first error of `e` as `dotted.path: what is allowed, got value` (+ how many more)."""
    errs = e.errors(include_url=False)
    err = errs[0]
    more = f" (and {len(errs) - 1} more)" if len(errs) > 1 else ""
    if isinstance((err.get("ctx") or {}).get("error"), SpecError):  # already names its field
        return f"{err['ctx']['error']}{more}"
    loc = tuple(err["loc"])
    below, msg = _message(err, cls, loc, prefix)
    path = _path(((prefix,) if prefix else ()) + loc)
    if below:
        path = f"{path}.{below}" if path else below
    return f"{path or 'job spec'}: {msg}{more}"
