"""Assemble a TinyONN model from a tiny teacher directory, train one step, save, reload, generate.

Run by tests/test_transformers_oldest.py under the oldest supported transformers (a subprocess whose
PYTHONPATH puts that version first): prints one JSON line with what it checked.
"""

import json
import sys

import torch
import transformers

from tinyonn import load_teacher
from tinyonn.clustering.plan import full_plan
from tinyonn.model.assemble import assemble
from tinyonn.model.modeling import TinyONNForCausalLM
from tinyonn.model.routing import RoutingConfig

teacher_dir, out_dir = sys.argv[1], sys.argv[2]
teacher, _ = load_teacher(teacher_dir)
model = assemble(teacher, full_plan(2, 128, 8, groups=2, seed=0), RoutingConfig(mode="all"))
tokens = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    dense_error = float((model(tokens).logits - teacher(tokens).logits).abs().max())
model.set_routing([RoutingConfig(mode="topk", top_k=3), RoutingConfig(mode="budget", unit_budget=0.5)])
model.train()
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
out = model(tokens, labels=tokens, output_router_logits=True)
out.loss.backward()
optimizer.step()
model.eval()
with torch.no_grad():
    logits = model(tokens).logits
model.save_pretrained(out_dir)
loaded = TinyONNForCausalLM.from_pretrained(out_dir)
with torch.no_grad():
    reloaded = loaded(tokens).logits
generated = loaded.generate(tokens[:1, :6], max_new_tokens=5, do_sample=False, pad_token_id=0)
print(json.dumps({
    "transformers": transformers.__version__,
    "dense_error": dense_error,
    "loss": float(out.loss),
    "router_outputs": len(out.router_outputs),
    "routing_reloaded": [r.mode for r in loaded.routing],
    "reload_equal": bool(torch.equal(logits, reloaded)),
    "generated": generated.shape[1],
}))
