"""``python train.py task=eval``: perplexity (token and word level) and weight bytes of saved HF models, per method."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig

from nz_lightning.lm import run
from nz_lightning.lm.data import ByteTokenizer
from nz_lightning.lm.evaluate import WindowDataset, count_words

ROOT = Path(__file__).resolve().parents[2]
WINDOW = 64
TEXT = "\n".join(
    f"Line {i}: the quick brown fox jumps over {i % 7} lazy dogs; naïve café prices rose {i * 3}%." for i in range(60)
)


pytestmark = pytest.mark.usefixtures("restore_cpu_threads")


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random LlamaForCausalLM (byte-level vocabulary) written with save_pretrained."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=260, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
    )  # fmt: skip
    path = tmp_path_factory.mktemp("llama") / "model"
    LlamaForCausalLM(config).save_pretrained(str(path))
    return path


def compose_eval(*overrides: str, output_dir: Path) -> DictConfig:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(
            config_name="train",
            overrides=["task=eval", "logger=none", *overrides, f"paths.output_dir={output_dir}"],
        )


def llama_eval(model_dir: Path, text_file: Path, tmp_path: Path, *overrides: str) -> DictConfig:
    return compose_eval(
        "model=hf_causal", f"model.pretrained={model_dir}", "model.dtype=float32", f"data.files=[{text_file}]",
        f"eval.window={WINDOW}", "callbacks.rich_progress_bar.leave=false", *overrides, output_dir=tmp_path,
    )  # fmt: skip


def reference_nll(model_dir: Path, text: str) -> tuple[float, int]:
    """Summed NLL and predicted tokens of non-overlapping byte-level windows, computed directly with transformers."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    ids = torch.tensor(ByteTokenizer().encode(text))
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, ids.numel(), WINDOW):
            window = ids[start : start + WINDOW][None]
            if window.shape[1] < 2:
                continue
            logits = model(input_ids=window).logits[0, :-1].float()
            total += float(F.cross_entropy(logits, window[0, 1:], reduction="sum"))
            count += window.shape[1] - 1
    return total, count


def test_windows_cover_the_stream() -> None:
    windows = WindowDataset(torch.arange(10), 4)
    assert [w["input_ids"].tolist() for w in windows] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert windows.complete and len(WindowDataset(torch.arange(9), 4)) == 2  # a 1-token tail predicts nothing
    assert len(WindowDataset(torch.arange(10), 4, max_windows=1)) == 1
    assert count_words(["a b\n c", "  d\t"]) == 4
    with pytest.raises(ValueError, match="window"):
        WindowDataset(torch.arange(10), 1)


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    path = tmp_path / "eval.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def test_eval_local_pretrained_llama_dense_and_lossless(saved_llama: Path, text_file: Path, tmp_path: Path) -> None:
    nll, count = reference_nll(saved_llama, TEXT)
    words = len(TEXT.split())
    dense = run.evaluate(llama_eval(saved_llama, text_file, tmp_path))["metrics"]
    assert dense["eval/tokens"] == count and dense["eval/words"] == words
    assert dense["eval/token_ppl"] == pytest.approx(math.exp(nll / count), rel=1e-4)
    assert dense["eval/word_ppl"] == pytest.approx(math.exp(nll / words), rel=1e-3)
    assert dense["eval/weight_bytes"] == 2 * dense["eval/bf16_bytes"] and dense["eval/weight_ratio"] == 2.0  # fp32

    lossless = run.evaluate(llama_eval(saved_llama, text_file, tmp_path, "+strategy=neuzip"))
    assert lossless["method"] == "neuzip lossless"
    assert lossless["metrics"]["eval/token_ppl"] == pytest.approx(dense["eval/token_ppl"], rel=1e-6)
    assert lossless["metrics"]["eval/weight_bytes"] < 0.95 * dense["eval/weight_bytes"]


@pytest.mark.parametrize("bits", [3, 0])
def test_eval_lossy_neuzip(saved_llama: Path, text_file: Path, tmp_path: Path, bits: int) -> None:
    dense = run.evaluate(llama_eval(saved_llama, text_file, tmp_path, "eval.max_windows=4"))["metrics"]
    lossy = run.evaluate(
        llama_eval(saved_llama, text_file, tmp_path, f"+strategy=neuzip_lossy_{bits}bit", "eval.max_windows=4")
    )
    assert lossy["method"] == f"neuzip {bits}-bit (block 512)"
    metrics = lossy["metrics"]
    assert metrics["eval/tokens"] == dense["eval/tokens"] == 4 * (WINDOW - 1)
    assert metrics["eval/words"] == dense["eval/words"] < len(TEXT.split())  # the words of the 4 windows' text
    assert metrics["eval/token_ppl"] != dense["eval/token_ppl"]
    assert metrics["eval/token_ppl"] == pytest.approx(dense["eval/token_ppl"], rel=0.02 if bits == 3 else 0.2)
    # fp32 weights: exponent (~3 bits) + sign and the kept mantissa bits, vs 16 bits in bf16
    assert metrics["eval/weight_ratio"] < (0.5 if bits == 3 else 0.35)


def test_eval_rowwise_int8(saved_llama: Path, text_file: Path, tmp_path: Path) -> None:
    dense = run.evaluate(llama_eval(saved_llama, text_file, tmp_path, "eval.max_windows=4"))["metrics"]
    int8 = run.evaluate(
        llama_eval(saved_llama, text_file, tmp_path, "eval.quantize=rowwise_int8", "eval.max_windows=4")
    )
    assert int8["method"] == "rowwise_int8"
    metrics = int8["metrics"]
    assert metrics["eval/token_ppl"] == pytest.approx(dense["eval/token_ppl"], rel=0.01)
    assert 0.5 < metrics["eval/weight_ratio"] < 0.6  # 1 byte per weight + fp32 row scales, vs 2 bytes


@pytest.mark.parametrize("mode", ["int8", "nf4", "fp4", "nf4_dq"])
def test_eval_bitsandbytes_baselines_on_cpu(saved_llama: Path, text_file: Path, tmp_path: Path, mode: str) -> None:
    """``+quant=<mode>`` on CPU: bitsandbytes layers (nz_lightning.lm.qlora), perplexity near bf16's, bytes counted."""
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed: its baselines cannot run")
    base = ("model.dtype=bfloat16", "eval.max_windows=4")
    dense = run.evaluate(llama_eval(saved_llama, text_file, tmp_path, *base))["metrics"]
    quant = run.evaluate(llama_eval(saved_llama, text_file, tmp_path, *base, f"+quant={mode}"))
    assert quant["method"] == f"bitsandbytes {mode.replace('_', '-')}"
    metrics = quant["metrics"]
    assert metrics["eval/tokens"] == dense["eval/tokens"] and dense["eval/weight_ratio"] == 1.0
    assert metrics["eval/token_ppl"] == pytest.approx(dense["eval/token_ppl"], rel=0.01 if mode == "int8" else 0.05)
    # the 2 x 64 x 260 bf16 embedding and output head (28% of the weights) stay dense; nf4-dq's 1 KiB code book per
    # layer outweighs its smaller block scales on these small layers
    low, high = {"int8": (0.6, 0.7), "nf4_dq": (0.5, 0.56)}.get(mode, (0.4, 0.5))
    assert low < metrics["eval/weight_ratio"] < high


def test_lightning_bitsandbytes_plugin_needs_cuda() -> None:
    """Lightning's own BitsandbytesPrecision (CUDA only) is refused on a CPU trainer, pointing to the quant configs."""
    from nz_lightning.lm.evaluate import check_quant_requirements

    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
    plugin = {"_target_": "lightning.pytorch.plugins.BitsandbytesPrecision", "mode": "nf4"}
    with pytest.raises(RuntimeError, match=r"BitsandbytesPrecision needs a CUDA GPU .*\+quant=nf4"):
        check_quant_requirements({"accelerator": "cpu", "plugins": [plugin]})


def test_eval_local_pretrained_t5(tmp_path: Path) -> None:
    from transformers import AutoModelForSeq2SeqLM, T5Config, T5ForConditionalGeneration

    rows = [{"question": f"count heads older than {n}", "answer": f"SELECT COUNT(*) FROM head WHERE age > {n}"}
            for n in range(12)]  # fmt: skip
    (tmp_path / "sql.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    tokenizer = tmp_path / "tok"
    _byte_level_tokenizer(tokenizer, [v for r in rows for v in r.values()])
    torch.manual_seed(0)
    small = dict(vocab_size=304, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4)
    T5ForConditionalGeneration(T5Config(**small, decoder_start_token_id=0)).save_pretrained(str(tmp_path / "t5"))
    cfg = compose_eval(
        "model=hf_seq2seq", f"model.pretrained={tmp_path / 't5'}", "model.dtype=float32", "data=sql",
        "data.dataset=json", f"data.data_files={tmp_path / 'sql.jsonl'}", f"data.tokenizer={tokenizer}",
        f"data.cache_dir={tmp_path / 'cache'}", "data.num_workers=0", "data.source_template='{question}'",
        "data.val_fraction=0.25", "eval.split=val", "callbacks.rich_progress_bar.leave=false", output_dir=tmp_path,
    )  # fmt: skip
    metrics = run.evaluate(cfg)["metrics"]
    dm = instantiate(cfg.data, _convert_="all")
    dm.setup()
    model = AutoModelForSeq2SeqLM.from_pretrained(str(tmp_path / "t5")).eval()
    nll, count = 0.0, 0
    with torch.no_grad():
        for pair in dm.data["val"]:
            labels = torch.tensor([pair["labels"]])
            logits = model(input_ids=torch.tensor([pair["input_ids"]]), labels=labels).logits[0]
            nll += float(F.cross_entropy(logits, labels[0], reduction="sum"))
            count += labels.numel()
    words = count_words(dm.raw_texts("val"))
    assert len(dm.data["val"]) == 3 and words == 3 * 8
    assert metrics["eval/tokens"] == count and metrics["eval/words"] == words
    assert metrics["eval/token_ppl"] == pytest.approx(math.exp(nll / count), rel=1e-4)
    assert metrics["eval/word_ppl"] == pytest.approx(math.exp(nll / words), rel=1e-3)


def _byte_level_tokenizer(path: Path, texts: list[str]) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "</s>", "<unk>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(str(path))


def test_eval_weights_from_lightning_checkpoint(saved_llama: Path, text_file: Path, tmp_path: Path) -> None:
    """eval.weights_from loads a training run's checkpoint (the module's state_dict) over the pretrained weights."""
    from transformers import AutoModelForCausalLM

    other = AutoModelForCausalLM.from_pretrained(str(saved_llama))
    torch.manual_seed(1)
    for p in other.parameters():
        p.data.add_(torch.randn_like(p) * 0.05)
    other.save_pretrained(str(tmp_path / "other"))
    ckpt = tmp_path / "final.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in other.state_dict().items()}}, ckpt)
    cfg = llama_eval(saved_llama, text_file, tmp_path, f"eval.weights_from={ckpt}", "+strategy=neuzip")
    metrics = run.evaluate(cfg)["metrics"]
    nll, count = reference_nll(tmp_path / "other", TEXT)
    assert metrics["eval/token_ppl"] == pytest.approx(math.exp(nll / count), rel=1e-4)
    assert metrics["eval/token_ppl"] != pytest.approx(math.exp(reference_nll(saved_llama, TEXT)[0] / count), rel=1e-3)


class _RunsCode:
    """Unpickling this touches a marker file: stands for any code a hostile checkpoint could run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (Path.touch, (self.marker,))


def test_eval_weights_from_refuses_pickled_objects(saved_llama: Path, text_file: Path, tmp_path: Path) -> None:
    """A checkpoint holding a pickled object is refused before anything in it runs, and the error says why."""
    marker = tmp_path / "code-ran"
    ckpt = tmp_path / "hostile.ckpt"
    torch.save({"state_dict": {}, "payload": _RunsCode(marker)}, ckpt)
    cfg = llama_eval(saved_llama, text_file, tmp_path, f"eval.weights_from={ckpt}")
    with pytest.raises(ValueError, match=r"refusing to load .*hostile\.ckpt.*weights_only=True"):
        run.evaluate(cfg)
    assert not marker.exists()
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty\.ckpt is not a readable checkpoint file"):
        run.evaluate(llama_eval(saved_llama, text_file, tmp_path, f"eval.weights_from={empty}"))
