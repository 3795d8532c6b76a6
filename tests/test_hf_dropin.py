"""The README's Hugging Face claim: `fitclip_ext.contrastive_loss(image_embeds, text_embeds,
logit_scale.exp())` is the loss `transformers.CLIPModel(return_loss=True)` computes (its
`clip_loss`, `image_text_contrastive_loss` in transformers 5), with the same gradients for every
parameter of the model: a tiny random CLIPModel in float64, on each fused backend.

Run in a child process outside the source tree: transformers 5 imports Hugging Face's `kernels`
package, which this repository's top-level kernels/ folder shadows when the checkout is on
sys.path (as under pytest); an installed fitclip_ext keeps its kernels inside the package."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                reason="transformers is not installed (make setup installs it)")

SCRIPT = r'''
import json, sys
import torch, transformers
import fitclip_ext

backend = sys.argv[1]
torch.manual_seed(0)
text = dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=16, eos_token_id=2, bos_token_id=1, pad_token_id=0)
vision = dict(image_size=16, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
              num_attention_heads=4)
model = transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision,
                                                       projection_dim=24)).double()
ids = torch.randint(3, 99, (6, 10))
pixels = torch.randn(6, 3, 16, 16, dtype=torch.float64)
params = list(model.parameters())
theirs = model(input_ids=ids, pixel_values=pixels, return_loss=True).loss
their_grads = torch.autograd.grad(theirs, params)
out = model(input_ids=ids, pixel_values=pixels)
ours = fitclip_ext.contrastive_loss(out.image_embeds, out.text_embeds, model.logit_scale.exp(), backend=backend)
our_grads = torch.autograd.grad(ours, params)
num = sum(((a - b).norm() ** 2).item() for a, b in zip(our_grads, their_grads))
den = sum((b.norm() ** 2).item() for b in their_grads)
print(json.dumps({"ours": ours.item(), "theirs": theirs.item(), "grad_rel_err": (num / den) ** 0.5, "den": den,
                  "version": transformers.__version__}))
'''


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_contrastive_loss_is_clipmodels_loss(backend, tmp_path):
    if backend == "triton" and importlib.util.find_spec("triton") is None:
        # (the Triton backend's case needs Triton, as every Triton test does; the C++ case still runs)
        pytest.skip("triton is not installed")
    script = tmp_path / "hf_clip.py"
    script.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["TRITON_INTERPRET"] = os.environ.get("TRITON_INTERPRET", "1")
    proc = subprocess.run([sys.executable, str(script), backend], capture_output=True, text=True, cwd=tmp_path,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert abs(r["ours"] - r["theirs"]) <= 1e-12 * abs(r["theirs"]), r
    assert r["den"] > 0 and r["grad_rel_err"] < 1e-10, r  # every parameter, the logit scale included
