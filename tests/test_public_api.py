"""The public API, path by path: every public name imports from the path the documentation gives, each module's
``__all__`` is exactly that list, re-exports are the same objects as their definitions, and every public function
and method carries type hints (the package ships ``py.typed``, so type checkers read them)."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CAPTURE = [
    "RewardAttentionCapture",
    "PrefixScoreCapture",
    "capture_reward_attention",
    "capture_prefix_scores",
    "score_and_densify",
    "score_with_credit",
]
ALIGN = ["token_byte_spans", "project_credit", "render_and_tokenize", "RewardModelInputs", "score_and_densify_text"]
VERL_CONFIG = [
    "ABCSettings",
    "ServedSettings",
    "check_algorithm",
    "check_routing",
    "check_served",
    "MODULE_PATH",
    "SEQUENCE_SUM_ESTIMATORS",
    "TOKEN_LEVEL_ESTIMATORS",
]

# module -> (its public names, the package its import needs or None)
PUBLIC = {
    "dense_rlhf": (
        [
            "dense_rewards",
            "prefix_rewards",
            "sparse_rewards",
            "uniform_rewards",
            "capture_reward_attention",
            "capture_prefix_scores",
            "score_and_densify",
            "score_with_credit",
            "score_and_densify_text",
            "__version__",
        ],
        None,
    ),
    "dense_rlhf.ops": (["dense_rewards", "prefix_rewards", "sparse_rewards", "uniform_rewards", "check_beta"], None),
    "dense_rlhf.capture": (CAPTURE, None),
    "dense_rlhf.capture.attention": (["RewardAttentionCapture", "capture_reward_attention"], None),
    "dense_rlhf.capture.prefix": (["PrefixScoreCapture", "capture_prefix_scores"], None),
    "dense_rlhf.capture.scoring": (["score_and_densify", "score_with_credit"], None),
    "dense_rlhf.align": (ALIGN, None),
    "dense_rlhf.align.spans": (["token_byte_spans"], None),
    "dense_rlhf.align.projection": (["project_credit"], None),
    "dense_rlhf.align.render": (["render_and_tokenize", "RewardModelInputs", "Prompts"], None),
    "dense_rlhf.align.scoring": (["score_and_densify_text"], None),
    "dense_rlhf.integrations.trl": (["ABCGRPOTrainer", "TESTED_TRL"], "trl"),
    "dense_rlhf.integrations.verl": (
        [
            "ABCRewardManager",
            "ABCSettings",
            "SampleResult",
            "ServedABCRewardManager",
            "ServedPrefixRewardManager",
            "ServedSettings",
            "TokenRewardManagerBase",
            "check_algorithm",
            "check_routing",
            "check_served",
            "compute_score",
            "load_reward_model",
        ],
        "verl",
    ),
    "dense_rlhf.integrations.verl_config": (VERL_CONFIG, None),
    "dense_rlhf.integrations.vllm": (
        [
            "ServedRewardModel",
            "ServedRewardModelError",
            "POOLER_CONFIG",
            "VERL_POOLER_CONFIG_KEY",
            "VERL_HF_OVERRIDES_KEY",
            "abc_hf_overrides",
        ],
        "aiohttp",
    ),
    "dense_rlhf.integrations.vllm_abc": (["VERL_HF_OVERRIDES_KEY", "abc_hf_overrides"], None),
    "dense_rlhf.integrations.vllm_plugin": (["ARCHITECTURES", "CHECKED_VERSIONS", "LAYER_KEY", "register"], None),
    "dense_rlhf.integrations.vllm_plugin.attention": (["head_row_sums"], None),
    "dense_rlhf.integrations.vllm_plugin.checks": (["Refused", "check_attention", "check_config"], None),
    "dense_rlhf.integrations.vllm_server": (["LocalVLLMServer", "CPU_ARGS", "free_port"], "aiohttp"),
}

# Names a module offers besides its __all__, used by code and tests elsewhere (verl's estimator sets are read from
# dense_rlhf.integrations.verl).
ALSO = {"dense_rlhf.integrations.verl": ["MODULE_PATH", "SEQUENCE_SUM_ESTIMATORS", "TOKEN_LEVEL_ESTIMATORS"]}


def _module(name: str):
    needs = PUBLIC[name][1]
    if needs is not None:
        pytest.importorskip(needs)
    return importlib.import_module(name)


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_every_public_name_imports_from_its_path(name):
    module = _module(name)
    for public in PUBLIC[name][0] + ALSO.get(name, []):
        namespace: dict = {}
        exec(f"from {name} import {public}", namespace)  # the import statement a user writes
        assert namespace[public] is getattr(module, public), (name, public)


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_all_lists_exactly_the_public_names(name):
    module = _module(name)
    if not hasattr(module, "__all__"):
        assert name == "dense_rlhf.ops", f"{name} has no __all__"  # ops' public names are its functions
        return
    assert len(module.__all__) == len(set(module.__all__)), module.__all__
    assert set(module.__all__) == set(PUBLIC[name][0])


def test_reexports_are_the_definitions():
    """One object per name: the top level, the packages and the modules that define them agree."""
    import dense_rlhf
    from dense_rlhf import align, capture, ops

    for name in ("dense_rewards", "prefix_rewards", "sparse_rewards", "uniform_rewards"):
        assert getattr(dense_rlhf, name) is getattr(ops, name)
    for name in CAPTURE:
        defined = getattr(capture, name)
        assert defined.__module__.startswith("dense_rlhf.capture."), (name, defined.__module__)
        assert getattr(importlib.import_module(defined.__module__), name) is defined
        if name in dense_rlhf.__all__:
            assert getattr(dense_rlhf, name) is defined
    for name in ALIGN:
        defined = getattr(align, name)
        assert getattr(importlib.import_module(defined.__module__), name) is defined
    assert dense_rlhf.score_and_densify_text is align.score_and_densify_text


def _callables(name: str):
    """(qualified name, function) of the module's public functions and of its public classes' public methods and
    ``__init__``, defined in dense_rlhf."""
    module = _module(name)
    for public in PUBLIC[name][0]:
        obj = getattr(module, public)
        if inspect.isfunction(obj):
            yield f"{name}.{public}", obj
        elif inspect.isclass(obj) and obj.__module__.startswith("dense_rlhf"):
            for attribute, value in vars(obj).items():
                value = value.__func__ if isinstance(value, (classmethod, staticmethod)) else value
                if inspect.isfunction(value) and (attribute == "__init__" or not attribute.startswith("_")):
                    yield f"{name}.{public}.{attribute}", value


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_public_functions_and_methods_are_typed(name):
    missing = []
    for qualified, function in _callables(name):
        signature = inspect.signature(function)
        for parameter in signature.parameters.values():
            if parameter.name not in ("self", "cls") and parameter.annotation is inspect.Parameter.empty:
                missing.append(f"{qualified}({parameter.name})")
        if function.__name__ != "__init__" and signature.return_annotation is inspect.Signature.empty:
            missing.append(f"{qualified} -> ?")
    assert not missing, missing


def test_the_package_is_marked_typed():
    """PEP 561: py.typed in the package, declared as package data (tests/test_packaging.py checks the wheel)."""
    assert (ROOT / "dense_rlhf" / "py.typed").is_file()
    assert 'dense_rlhf = ["py.typed"]' in (ROOT / "pyproject.toml").read_text()
