"""Quick start: the model the demo trained, from Python.

Run ``bash scripts/demo.sh`` first (it writes ``runs/demo``), then::

    .venv/bin/python examples/python/quickstart.py [RUN_FOLDER]

It loads the model and its tokenizer, generates an answer with the settings the run folder
recommends, scores two candidate answers, and takes one training step with the fused loss.
"""

import sys

import torch

import llada_ext as lx
from llada_ext.tokenizer import load_tokenizer
from llada_ext.training import sft_loss

folder = sys.argv[1] if len(sys.argv) > 1 else "runs/demo"

# 1. the model and its tokenizer (the demo's byte-level one; a folder with a tokenizer.json
#    gets that tokenizer instead)
model = lx.LLaDAModel.from_pretrained(folder)
tokenizer = load_tokenizer(folder)

# 2. generate: the folder's generation_config.json says which settings fit this model
prompt = "reverse: abcd = "
prompt_ids = torch.tensor([tokenizer.encode(prompt)])
out = lx.generate(model, prompt_ids, **lx.generation_settings(folder))
answer = lx.decode_answers(tokenizer, out, prompt_ids.shape[1])[0]  # cut at the first EOS
print(f"generate: {prompt}{answer}")

# 3. score two answers by their log-likelihood (Alg. 3 of the LLaDA paper)
choices = ["dcba", "abcd"]
scores = lx.score_choices(
    model,
    prompt_ids[0],
    [tokenizer.encode(c) for c in choices],
    mc_num=32,
    generator=torch.Generator().manual_seed(0),
)
for choice, score in zip(choices, scores):
    print(f"log p({choice!r} | {prompt!r}) ~ {score:.3f}")

# 4. one SFT step (Alg. 2): the prompt is never masked, the answer padded with EOS; the loss
#    runs through the fused LM head + masked cross-entropy kernel
eos = tokenizer.eos_token_id
answer_ids = tokenizer.encode("dcba") + [eos] * 3
input_ids = torch.tensor([prompt_ids[0].tolist() + answer_ids])
prompt_lengths = torch.tensor([prompt_ids.shape[1]])
model.train()
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
loss = sft_loss(model, input_ids, prompt_lengths, generator=torch.Generator().manual_seed(0))
loss.backward()
optimizer.step()
print(f"one SFT step: loss {loss.item():.4f}")
