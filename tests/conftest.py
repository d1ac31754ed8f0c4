"""Tiny random models of every supported family, built from a config: no files, seconds to run."""

import os
import tempfile

import pytest
import torch
import transformers as tf

FAMILIES = ["llama", "qwen2", "mistral", "gemma", "gemma3", "opt", "gpt2", "phi"]
VOCAB = 128


def tiny_config(family: str):
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=256)
    if family == "llama":  # grouped-query attention: 4 query heads share 2 key/value heads
        return tf.LlamaConfig(**common, num_key_value_heads=2)
    if family == "qwen2":
        return tf.Qwen2Config(**common, num_key_value_heads=2)
    if family == "mistral":
        return tf.MistralConfig(**common, num_key_value_heads=2, sliding_window=16)
    if family == "gemma":
        return tf.GemmaConfig(**common, num_key_value_heads=1, head_dim=16)
    if family == "gemma3":  # per-layer masks and rotary tables: one sliding, one full attention layer
        return tf.Gemma3TextConfig(**common, num_key_value_heads=2, head_dim=16, sliding_window=8,
                                   layer_types=["sliding_attention", "full_attention"])
    if family == "opt":
        return tf.OPTConfig(vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=256, word_embed_proj_dim=64)
    if family == "gpt2":  # Conv1D weights, stored (in, out)
        return tf.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=256)
    if family == "phi":  # attention and MLP read the same normalised input (parallel block)
        return tf.PhiConfig(**common)
    raise ValueError(family)


@pytest.fixture
def unwritable() -> str:
    """Why nothing can be created in ``/sys``, where not even root may make a folder (Linux's sysfs); tests that
    use it are skipped where it takes new folders."""
    try:
        os.rmdir(tempfile.mkdtemp(dir="/sys"))
    except OSError as exc:
        return exc.strerror
    pytest.skip("/sys takes new folders here")


@pytest.fixture
def free_space(monkeypatch):
    """``free_space(n)``: from now on every disk reports ``n`` bytes free (``shutil.disk_usage`` is faked)."""
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")

    def set_free(n: int) -> None:
        monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(2**40, 2**40 - n, n))

    return set_free


MOE_FAMILIES = ["mixtral", "qwen2moe", "qwen3moe", "olmoe"]


def tiny_moe(family: str, vocab: int = VOCAB, seed: int = 0, **extra):
    """A tiny random mixture of experts: 4 experts, 2 per token, 2 blocks.  ``qwen2moe`` has a shared expert
    and its first block dense (``mlp_only_layers``); ``gptoss`` keeps its experts in a layout secateurs does not
    prune (transposed, with biases)."""
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=256, num_experts_per_tok=2)
    if family == "mixtral":
        config = tf.MixtralConfig(**common, intermediate_size=128, num_local_experts=4)
    elif family == "qwen2moe":
        config = tf.Qwen2MoeConfig(**common, intermediate_size=128, moe_intermediate_size=64, num_experts=4,
                                   shared_expert_intermediate_size=96, mlp_only_layers=[0])
    elif family == "qwen3moe":
        config = tf.Qwen3MoeConfig(**common, intermediate_size=128, moe_intermediate_size=64, num_experts=4,
                                   head_dim=16)
    elif family == "olmoe":
        config = tf.OlmoeConfig(**common, intermediate_size=64, num_experts=4)
    elif family == "gptoss":
        config = tf.GptOssConfig(**common, head_dim=16, intermediate_size=64, num_local_experts=4)
    else:
        raise ValueError(family)
    for key, value in extra.items():
        setattr(config, key, value)
    return tf.AutoModelForCausalLM.from_config(config).eval()


def tiny_model(family: str, seed: int = 0):
    torch.manual_seed(seed)
    config = tiny_config(family)
    model = tf.AutoModelForCausalLM.from_config(config)
    return model.eval()


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture
def calib_ids():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, VOCAB, (6, 32), generator=g)


SENTENCES = ["the cat sat on the mat.", "a dog ran in the park.", "birds sing at dawn.",
             "rain falls on the old roof.", "the river runs to the sea."]


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny Llama with a real (trained) byte-level BPE tokenizer, saved as a local model folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers

    root = tmp_path_factory.mktemp("tiny")
    text = " ".join(SENTENCES[i % 5] for i in range(3000))
    (root / "train.txt").write_text(text)
    (root / "test.txt").write_text(" ".join(SENTENCES[(i * 3) % 5] for i in range(600)))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"],
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = tf.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = tf.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(root / "model")
    fast.save_pretrained(root / "model")
    return root


def cli_args(tiny_dir, *extra):
    """Common flags for CLI runs on the tiny model folder: its own text for calibration and evaluation."""
    return ["--model", str(tiny_dir / "model"), "--quiet", "--calib-data", str(tiny_dir / "train.txt"),
            "--calib-samples", "4", "--calib-seqlen", "32", "--eval-data", str(tiny_dir / "test.txt"),
            "--eval-seqlen", "32", "--eval-windows", "3", *extra]
