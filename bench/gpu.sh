#!/usr/bin/env bash
# GPU measurements, ready for a lent GPU (none was lent when this was written: nothing is claimed yet).
# Builds the sd15-architecture preset (random weights, nothing downloaded), then per backend -- torch fp16
# eager, torch.compile, ONNX Runtime CUDA (fp16), TensorRT (fp16) -- times one UNet call at batch 1 and 8
# (x2 for guidance), 512x512, and writes JSON with the device name to $OUT (default bench/out/gpu.json).
#   bash bench/gpu.sh [PRESET_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
PRESET=${1:-/tmp/pigment-sd15}
OUT=${OUT:-bench/out/gpu.json}
mkdir -p "$(dirname "$OUT")"
[ -f "$PRESET/manifest.json" ] || "$PY" -m pigment.services.cli models build --arch sd15 --dir "$PRESET"
"$PY" - "$PRESET" "$OUT" <<'PYEOF'
import json, sys, time, traceback
import torch
from pigment.models.loader import load_component
from pigment.models.backends import load_unet_backend

preset, out = sys.argv[1], sys.argv[2]
assert torch.cuda.is_available(), "no CUDA device"
unet = load_component(preset, "unet").to("cuda", torch.float16)
result = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "size": 512,
          "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "runs": []}
configs = [("torch", {}), ("torch", {"compile": True}), ("onnxruntime", {}), ("tensorrt", {})]
for backend, options in configs:
    name = backend + ("+compile" if options.get("compile") else "")
    try:
        t0 = time.perf_counter()
        runner = load_unet_backend(backend, unet, cache_dir=f"{preset}/.engines", device="cuda", precision="fp16",
                                   **options)
        load_s = time.perf_counter() - t0
        for batch in (1, 8):
            n = 2 * batch  # classifier-free guidance doubles the UNet batch
            x = torch.randn(n, 4, 64, 64, device="cuda", dtype=torch.float16)
            ehs = torch.randn(n, 77, 768, device="cuda", dtype=torch.float16)
            for _ in range(3):  # warm-up (compile, autotune)
                runner(x, 500, encoder_hidden_states=ehs, return_dict=False)
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(10):
                runner(x, 500, encoder_hidden_states=ehs, return_dict=False)
            torch.cuda.synchronize()
            ms = (time.perf_counter() - t) / 10 * 1000
            result["runs"].append({"backend": name, "batch": batch, "unet_batch": n, "unet_call_ms": round(ms, 2),
                                   "load_s": round(load_s, 1),
                                   "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2)})
            print(result["runs"][-1], flush=True)
        runner.close()
    except Exception as exc:  # a backend that cannot run here is recorded, the others still measured
        result["runs"].append({"backend": name, "error": f"{type(exc).__name__}: {exc}",
                               "traceback": traceback.format_exc(limit=3)})
        print(result["runs"][-1], flush=True)
json.dump(result, open(out, "w"), indent=2)
print("wrote", out)
PYEOF
