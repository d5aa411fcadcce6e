"""Names used on the command line, mapped to attack classes."""
from __future__ import annotations

import dataclasses
from typing import Any

from attacks.apgd import APGD
from attacks.base import Attack
from attacks.carlini_wagner import CarliniWagnerL2
from attacks.deepfool import DeepFool
from attacks.gradient_sign import BIM, FGSM, MIFGSM, PGD
from attacks.jsma import JSMA

ATTACKS: dict[str, type[Attack]] = {
    cls.name: cls for cls in (FGSM, BIM, PGD, MIFGSM, APGD, CarliniWagnerL2, DeepFool, JSMA)
}


def attack_class(name: str) -> type[Attack]:
    try:
        return ATTACKS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown attack {name!r}: expected one of {sorted(ATTACKS)}") from None


def make_attack(name: str, **params: Any) -> Attack:
    """Build the attack registered as `name`; unknown names and parameters are a ValueError."""
    cls = attack_class(name)
    fields = [f for f in dataclasses.fields(cls) if f.init]
    accepted = {f.name for f in fields}
    unknown = sorted(set(params) - accepted)
    if unknown:
        raise ValueError(f"attack {name!r} takes no parameter {unknown}; it takes {sorted(accepted)}")
    required = {f.name for f in fields if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    missing = sorted(required - set(params))
    if missing:
        raise ValueError(f"attack {name!r} needs the parameter(s) {missing}")
    return cls(**params)


def _parse_value(text: str) -> Any:
    """A parameter value from the command line: bool, int, float, a fraction like 8/255, or text."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for convert in (int, float):
        try:
            return convert(lowered)
        except ValueError:
            pass
    numerator, slash, denominator = lowered.partition("/")
    if slash:
        try:
            return float(numerator) / float(denominator)
        except (ValueError, ZeroDivisionError):
            pass
    return text.strip()


def parse_attack_spec(
    spec: str, defaults: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None
) -> Attack:
    """Build an attack from `name[:key=value,key=value...]`, e.g. `pgd:eps=8/255,steps=20,norm=inf`.

    `defaults` fill parameters the spec leaves out (e.g. the data's conventional eps); `overrides`
    (e.g. separate command-line flags) win over the spec.
    """
    name, _, rest = spec.partition(":")
    accepted = {f.name for f in dataclasses.fields(attack_class(name.strip())) if f.init}
    params = {key: value for key, value in (defaults or {}).items() if key in accepted}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, equals, value = item.partition("=")
        if not equals or not key.strip():
            raise ValueError(f"cannot parse attack spec {spec!r}: expected name:key=value,key=value")
        params[key.strip().replace("-", "_")] = _parse_value(value)
    return make_attack(name.strip(), **(params | (overrides or {})))
