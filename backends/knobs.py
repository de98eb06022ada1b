"""Load-test knobs: the grammar that makes a worker behave like a real service on demand.

A knob is a query parameter (`?delay=20ms&error_rate=0.05`) or the same name as a worker option
(`--delay 20ms --error-rate 0.05`, a process-wide default that a query parameter overrides). This
module is the pure half: it parses knobs into a frozen `Knobs` and draws one request's fate from them
(`decide`) with an injected `random.Random`; `backends.service` does the I/O. No aiohttp, no clock.

Grammar (every value is checked; a bad one is a `KnobError` whose text is the 400 body):

    duration  = NUMBER ("ms" | "s")?        a bare number is seconds, as in httpbin and balancer's config
    delay     = duration                    fixed
              | duration "-" duration       uniform between the two
              | "lognormal:" duration ":" duration
                                            median (p50) and 99th percentile (p99)
    size      = NUMBER ("B" | "KB" | "MB" | "GB" | "KiB" | "MiB" | "GiB" | "k" | "m" | "g")?
                                            case-insensitive; KB = 1000, KiB = k = 1024 (as nginx)
    statuses  = code (":" weight)? ("," code (":" weight)?)*   weight defaults to 1 (httpbin's form)
    rate      = a number in [0, 1]
    flag      = "1" | "0" | "true" | "false"
    header    = NAME ":" VALUE              repeat the parameter for several; VALUE may hold commas

Bounds: durations ≤ 60 s (a lognormal draw above that is cut to 60 s), sizes ≤ 1 GiB, codes 200-599.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

MAX_DELAY_S = 60.0
MAX_SIZE = 2**30
Z_99 = 2.3263478740408408
"""The standard normal's 99th percentile: a lognormal's p99 is exp(mu + Z_99 * sigma)."""


class KnobError(ValueError):
    """A knob value outside the grammar or its bounds; str() is a one-line message for the client."""


# --- scalars ----------------------------------------------------------------------------------------

_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)"
_DURATION = re.compile(rf"({_NUMBER})(ms|s)?", re.ASCII)
_SIZE = re.compile(rf"({_NUMBER})\s*([kmg]i?b|[bkmg])?", re.ASCII | re.IGNORECASE)
_SIZE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
_SIZE_UNITS |= {"k": 2**10, "m": 2**20, "g": 2**30}  # nginx's suffixes
_CODE = re.compile(r"\d{3}", re.ASCII)
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+", re.ASCII)
_BAD_VALUE_CHARS = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_FRAMING_HEADERS = {
    "content-length": "use size",
    "transfer-encoding": "use chunked",
    "connection": "use close",
}


def parse_duration(text: str, name: str = "duration") -> float:
    """Seconds from `20ms`, `1.5s` or a bare number of seconds (`0.02`); at most MAX_DELAY_S."""
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise KnobError(f"{name}: expected a duration like 20ms, 1.5s or 0.02 (seconds), got {text!r}")
    number, unit = float(match[1]), match[2]
    seconds = number / 1000 if unit == "ms" else number
    if seconds > MAX_DELAY_S:
        raise KnobError(f"{name}: at most {MAX_DELAY_S:g}s, got {text!r}")
    return seconds


def parse_size(text: str, name: str = "size") -> int:
    """Bytes from `65536`, `64KiB`, `64k`, `1MB`, `1.5MiB`; at most MAX_SIZE (1 GiB)."""
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise KnobError(f"{name}: expected a size like 1024, 64KiB or 1MB, got {text!r}")
    size = float(match[1]) * _SIZE_UNITS[(match[2] or "b").lower()]
    if size > MAX_SIZE:  # also catches an overflow to inf before int() would raise
        raise KnobError(f"{name}: at most 1GiB, got {text!r}")
    return int(size)


def parse_rate(text: str, name: str = "rate") -> float:
    try:
        rate = float(text)
    except ValueError:
        rate = math.nan
    if not 0.0 <= rate <= 1.0:  # also rejects nan
        raise KnobError(f"{name}: expected a fraction between 0 and 1, got {text!r}")
    return rate


def parse_code(text: str, name: str = "status") -> int:
    """An HTTP status a worker may answer with: 200-599 (1xx are not final responses)."""
    if _CODE.fullmatch(text.strip()) is None or not 200 <= int(text) <= 599:
        raise KnobError(f"{name}: expected a status code 200-599, got {text!r}")
    return int(text)


def parse_flag(text: str, name: str = "flag") -> bool:
    value = text.strip().lower()
    if value not in ("1", "0", "true", "false"):
        raise KnobError(f"{name}: expected 1 or 0, got {text!r}")
    return value in ("1", "true")


def parse_header(text: str, name: str = "headers") -> tuple[str, str]:
    """`Name:value` → (name, value with surrounding blanks removed). Framing headers are refused."""
    field_name, colon, value = text.partition(":")
    if not colon or _TOKEN.fullmatch(field_name) is None:
        raise KnobError(f"{name}: expected Name:value with a valid header name, got {text!r}")
    if _BAD_VALUE_CHARS.search(value):
        raise KnobError(f"{name}: control characters in the value of {field_name}")
    if hint := _FRAMING_HEADERS.get(field_name.lower()):
        raise KnobError(f"{name}: {field_name} cannot be set ({hint} instead)")
    return field_name, value.strip(" \t")


# --- distributions ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Fixed:
    seconds: float

    def draw(self, rng: random.Random) -> float:
        return self.seconds


@dataclass(frozen=True, slots=True)
class Uniform:
    low_s: float
    high_s: float

    def draw(self, rng: random.Random) -> float:
        return rng.uniform(self.low_s, self.high_s)


@dataclass(frozen=True, slots=True)
class Lognormal:
    """The lognormal whose median is `p50_s` and 99th percentile `p99_s`: a service-time shape with a
    long tail (most requests near p50, one in a hundred beyond p99)."""

    p50_s: float
    p99_s: float

    @property
    def mu(self) -> float:
        return math.log(self.p50_s)

    @property
    def sigma(self) -> float:
        return math.log(self.p99_s / self.p50_s) / Z_99

    def draw(self, rng: random.Random) -> float:
        return min(rng.lognormvariate(self.mu, self.sigma), MAX_DELAY_S)


DelaySpec = Fixed | Uniform | Lognormal


def parse_delay(text: str, name: str = "delay") -> DelaySpec:
    """`20ms` (fixed), `10ms-200ms` (uniform) or `lognormal:50ms:200ms` (p50:p99)."""
    if text.startswith("lognormal:"):
        p50_text, colon, p99_text = text.removeprefix("lognormal:").partition(":")
        if not colon:
            raise KnobError(f"{name}: expected lognormal:P50:P99 like lognormal:50ms:200ms, got {text!r}")
        p50, p99 = parse_duration(p50_text, name), parse_duration(p99_text, name)
        if not 0 < p50 <= p99:
            raise KnobError(f"{name}: lognormal needs 0 < p50 <= p99, got {text!r}")
        return Lognormal(p50, p99)
    low_text, dash, high_text = text.partition("-")
    if dash:
        low, high = parse_duration(low_text, name), parse_duration(high_text, name)
        if low > high:
            raise KnobError(f"{name}: a range must go from low to high, got {text!r}")
        return Uniform(low, high)
    return Fixed(parse_duration(text, name))


@dataclass(frozen=True, slots=True)
class StatusChoice:
    """A weighted pick among status codes (`200:0.9,503:0.1`; a single code is always that code)."""

    codes: tuple[int, ...]
    weights: tuple[float, ...]

    def draw(self, rng: random.Random) -> int:
        if len(self.codes) == 1:
            return self.codes[0]
        return rng.choices(self.codes, self.weights)[0]


def parse_statuses(text: str, name: str = "status") -> StatusChoice:
    codes: list[int] = []
    weights: list[float] = []
    for item in text.split(","):
        code_text, colon, weight_text = item.partition(":")
        codes.append(parse_code(code_text, name))
        try:
            weight = float(weight_text) if colon else 1.0
        except ValueError:
            weight = math.nan
        if not 0 <= weight < math.inf:
            raise KnobError(f"{name}: a weight must be a number >= 0, got {item!r}")
        weights.append(weight)
    if not 0 < sum(weights) < math.inf:
        raise KnobError(f"{name}: the weights must add up to a positive number, got {text!r}")
    return StatusChoice(tuple(codes), tuple(weights))


# --- the knobs of one request -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Knobs:
    """What a request asked for (over the worker's defaults). None / 0 / () mean "as the endpoint does"."""

    delay: DelaySpec | None = None
    status: StatusChoice | None = None
    error_rate: float = 0.0
    error_status: int = 500
    size: int | None = None
    chunked: bool = False
    drip: DelaySpec | None = None
    close: bool = False
    reset_rate: float = 0.0
    headers: tuple[tuple[str, str], ...] = ()


NO_KNOBS = Knobs()

# How each knob's text becomes its value; `headers` is the one that may repeat.
_PARSERS: dict[str, Callable[[str, str], object]] = {
    "delay": parse_delay,
    "status": parse_statuses,
    "error_rate": parse_rate,
    "error_status": parse_code,
    "size": parse_size,
    "chunked": parse_flag,
    "drip": parse_delay,
    "close": parse_flag,
    "reset_rate": parse_rate,
}
KNOB_NAMES = frozenset([*_PARSERS, "headers"])


def parse_knob(name: str, text: str) -> object:
    """One knob's value (for `headers`, one (name, value) pair); raises KnobError."""
    if name == "headers":
        return parse_header(text, name)
    return _PARSERS[name](text, name)


def parse_knobs(pairs: Iterable[tuple[str, str]], defaults: Knobs = NO_KNOBS) -> Knobs:
    """`defaults` with each knob named in `pairs` replaced; other names in `pairs` are ignored.

    A knob given twice takes its last value, except `headers`, whose values all count (and replace
    the defaults' headers as a whole).
    """
    changes: dict[str, object] = {}
    headers: list[tuple[str, str]] = []
    for name, text in pairs:
        if name == "headers":
            headers.append(parse_header(text, name))
        elif name in _PARSERS:
            changes[name] = _PARSERS[name](text, name)
    if headers:
        changes["headers"] = tuple(headers)
    return replace(defaults, **changes) if changes else defaults  # type: ignore[arg-type]


# --- one request's fate -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Plan:
    """What happens to one request, drawn once: wait `delay_s`, then either reset the connection, or
    answer `error_status` instead of the endpoint, or let the endpoint answer (with `status` if set)."""

    knobs: Knobs
    delay_s: float = 0.0
    is_reset: bool = False
    error_status: int | None = None
    status: int | None = None


def draw_delay(spec: DelaySpec, rng: random.Random) -> float:
    """One delay in seconds from `spec` (the pure function the distribution tests sample)."""
    return spec.draw(rng)


def decide(knobs: Knobs, rng: random.Random) -> Plan:
    delay_s = knobs.delay.draw(rng) if knobs.delay is not None else 0.0
    if knobs.reset_rate and rng.random() < knobs.reset_rate:
        return Plan(knobs, delay_s, is_reset=True)
    if knobs.error_rate and rng.random() < knobs.error_rate:
        return Plan(knobs, delay_s, error_status=knobs.error_status)
    status = knobs.status.draw(rng) if knobs.status is not None else None
    return Plan(knobs, delay_s, status=status)
