"""Field types shared by every schema (pipeline file, stage options, adapter options).

pydantic's lax mode reads `threads: yes` as 1 and `steps: 1.0e+26` as a 27-digit int, and takes `.inf`
and `.nan` as bounds. A count here is a plain YAML integer within a sane range; a real number is finite.

    from compress.schema import Count, Real
    steps: Count = Field(100, gt=0)      # the Field's bounds narrow the type's own
    lr: Real = Field(1e-3, gt=0)
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AllowInfNan, BeforeValidator, Field
from pydantic_core import PydanticCustomError

#: Above this no count is meaningful (steps, samples, iterations, sizes in MiB): an int32's range.
MAX_COUNT = 2**31 - 1
#: numpy's and torch's seeds both take 0 .. 2**32 - 1.
MAX_SEED = 2**32 - 1
#: More intra-op threads than this is a typo, not a machine.
MAX_THREADS = 1024


def _whole_number(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, int):
        raise PydanticCustomError(
            "whole_number", "expected a whole number written with digits (not yes/no, 2.0, 1e6 or a string)"
        )
    return value


def _real_number(value: Any) -> Any:
    if isinstance(value, bool):
        raise PydanticCustomError("real_number", "expected a number, not yes/no")
    return value


#: A non-negative integer count; narrow it with `Field(gt=0)` or a smaller `le`.
Count = Annotated[int, BeforeValidator(_whole_number), Field(ge=0, le=MAX_COUNT)]
#: A count of at least one (batch sizes, prompt lengths, profile dims).
PositiveCount = Annotated[Count, Field(gt=0)]
#: A random seed.
Seed = Annotated[int, BeforeValidator(_whole_number), Field(ge=0, le=MAX_SEED)]
#: A thread count (a count above the machine's cores is allowed, with a warning: see `config`).
Threads = Annotated[int, BeforeValidator(_whole_number), Field(gt=0, le=MAX_THREADS)]
#: A finite float (`.inf` and `.nan` are refused).
Real = Annotated[float, BeforeValidator(_real_number), AllowInfNan(False)]
