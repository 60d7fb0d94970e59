"""Train the bundled model (workers/bundled/model) on the task suite, on CPU, by hand.

    PYTHONPATH=. python tools/train_bundled.py --minutes 45 --out workers/bundled/model

LLaDA's SFT recipe: the prompt (chat template applied) is never masked; the answer is followed by
EOS padding to a window; each answer token is masked with probability t ~ U(eps, 1); the loss on
masked tokens is weighted 1/t and normalised by the window length. The window is drawn per
batch from WINDOWS so the model has seen every gen_length the benchmarks use. Not part of CI.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from workers.bundled import tasks
from workers.loader import save_model
from workers.tokenizer import chat_ids
from workers.models.llada import LLaDAConfig, LLaDAModel

SPECIALS = ["<|startoftext|>", "<|endoftext|>", "<|eot_id|>", "<|user|>", "<|assistant|>", "<|system|>", "<|mdm_mask|>"]
# One special token per role keeps the template to 4 tokens around a single message: at this
# model's size the prompt is a third of the training compute, so every template token counts.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<|' + message['role'] + '|>' }}"
    "{{ message['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
WINDOWS = (32, 64, 128, 256)
WINDOW_WEIGHTS = (0.7, 0.15, 0.1, 0.05)
ARCH = dict(d_model=192, n_heads=6, n_kv_heads=6, n_layers=4, mlp_hidden_size=512)


def build_tokenizer(out: Path):
    """Byte-level tokenizer with no merges: every byte (so every digit and letter) is one token."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
                "mask_token": "<|mdm_mask|>",
                "additional_special_tokens": ["<|eot_id|>", "<|user|>", "<|assistant|>", "<|system|>"],
                "model_max_length": 1024,
                "chat_template": CHAT_TEMPLATE,
            },
            indent=2,
        )
        + "\n"
    )
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(out))


def make_batch(tokenizer, rng, window, batch_size, exclude, eos_id, mask_id, eps=0.05):
    prompts, answers = [], []
    while len(prompts) < batch_size:
        ex = tasks.sample(rng)
        if ex.prompt in exclude:
            continue
        ids = chat_ids(tokenizer, ex.messages)
        ans = tokenizer.encode(ex.answer, add_special_tokens=False) + [eos_id]
        prompts.append(ids)
        answers.append(ans[:window] + [eos_id] * (window - len(ans)))
    longest = max(map(len, prompts))
    L = longest + window
    input_ids = torch.full((batch_size, L), eos_id, dtype=torch.long)
    key_mask = torch.zeros(batch_size, L, dtype=torch.bool)
    positions = torch.zeros(batch_size, L, dtype=torch.long)
    for i, p in enumerate(prompts):
        pad = longest - len(p)
        input_ids[i, pad:] = torch.tensor(p + answers[i])
        key_mask[i, pad:] = True
        positions[i, pad:] = torch.arange(L - pad)
    target = input_ids.clone()
    # t ~ U(eps, 1) per example, stratified over the batch (one draw per 1/batch_size slice), which
    # keeps the 1/t-weighted loss's variance down at small batch sizes
    strata = (torch.arange(batch_size) + torch.rand(batch_size))[torch.randperm(batch_size)] / batch_size
    t = (eps + (1 - eps) * strata)[:, None]
    masked = torch.zeros(batch_size, L, dtype=torch.bool)
    masked[:, longest:] = torch.rand(batch_size, window) < t
    input_ids[masked] = mask_id
    return input_ids, positions, key_mask, target, masked, t


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("workers/bundled/model"))
    ap.add_argument("--minutes", type=float, default=45.0, help="wall-clock training budget")
    ap.add_argument("--tokens-per-batch", type=int, default=4096)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rng = random.Random(args.seed)

    tokenizer = build_tokenizer(args.out)
    eos_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    mask_id = tokenizer.convert_tokens_to_ids("<|mdm_mask|>")
    vocab = len(tokenizer)
    raw_config = dict(
        model_type="llada",
        architectures=["LLaDAModelLM"],
        block_type="llama",
        activation_type="silu",
        layer_norm_type="rms",
        rope=True,
        **ARCH,
        vocab_size=vocab,
        embedding_size=(vocab + 7) // 8 * 8,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        weight_tying=False,
        mask_token_id=mask_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        max_sequence_length=1024,
    )
    model = LLaDAModel(LLaDAConfig.from_dict(raw_config))
    for name, p in model.named_parameters():
        if p.dim() == 2:
            torch.nn.init.normal_(p, std=0.02)
    print(f"parameters: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M, vocab {vocab}")

    exclude = {ex.prompt for ex in tasks.held_out(per_task=1000)}
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    budget = args.minutes * 60
    start = time.time()
    step, ema = 0, None
    while (elapsed := time.time() - start) < budget:
        frac = elapsed / budget
        lr = args.lr * min(1.0, (step + 1) / 100) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        window = rng.choices(WINDOWS, WINDOW_WEIGHTS)[0]
        batch_size = max(4, args.tokens_per_batch // (window + 20))
        ids, pos, kmask, target, masked, t = make_batch(tokenizer, rng, window, batch_size, exclude, eos_id, mask_id)
        logits = model(ids, pos, kmask)
        ce = F.cross_entropy(logits[masked], target[masked], reduction="none")
        weight = (1.0 / t).expand_as(masked)[masked] / window
        loss = (ce * weight).sum() / batch_size
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if step % 50 == 0:
            print(f"step {step:5d}  {elapsed / 60:5.1f} min  lr {lr:.2e}  loss {ema:.4f}", flush=True)
        if step % 500 == 0:
            save_model(model, args.out, raw_config)
    save_model(model, args.out, raw_config)
    print(f"saved {args.out} after {step} steps, {(time.time() - start) / 60:.1f} min")


if __name__ == "__main__":
    main()
