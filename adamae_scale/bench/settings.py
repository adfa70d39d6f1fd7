"""``key=value`` settings of the ``memory`` and ``step`` benchmarks: the keys a benchmark knows are its
options, every other one is an ``adamae-pretrain`` override. Each bad value is a one-line ``ValueError``
that names the benchmark and the setting, which ``adamae-bench`` prints and exits 2 on."""

from __future__ import annotations

TRUE, FALSE = ("true", "1", "yes"), ("false", "0", "no")


def split_settings(benchmark: str, settings: list[str], defaults: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """``key=value`` settings → (this benchmark's options over ``defaults``, the pre-training overrides)."""
    options, overrides = dict(defaults), []
    for arg in settings:
        key, sep, value = arg.partition("=")
        if not sep:
            raise ValueError(f"{benchmark}: expected key=value, got {arg!r}")
        if key in options:
            options[key] = value
        else:
            overrides.append(arg)
    return options, overrides


def flag(benchmark: str, options: dict[str, str], key: str) -> bool:
    value = options[key].lower()
    if value not in TRUE + FALSE:
        raise ValueError(f"{benchmark}: {key}={options[key]}: expected true or false")
    return value in TRUE


def integer(benchmark: str, options: dict[str, str], key: str, minimum: int) -> int:
    try:
        value = int(options[key])
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise ValueError(f"{benchmark}: {key}={options[key]}: expected an integer >= {minimum}")
    return value
