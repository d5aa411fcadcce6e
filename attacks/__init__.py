"""Adversarial attacks on Keras classifiers, written once in keras.ops for every backend."""
from attacks.apgd import APGD
from attacks.base import Attack, AttackResult
from attacks.carlini_wagner import CarliniWagnerL2
from attacks.deepfool import DeepFool
from attacks.gradient_sign import BIM, FGSM, MIFGSM, PGD, GradientSignAttack
from attacks.jsma import JSMA
from attacks.registry import ATTACKS, make_attack, parse_attack_spec

__all__ = ["APGD", "ATTACKS", "Attack", "AttackResult", "BIM", "CarliniWagnerL2", "DeepFool", "JSMA", "FGSM", "GradientSignAttack", "MIFGSM", "PGD", "make_attack", "parse_attack_spec"]
