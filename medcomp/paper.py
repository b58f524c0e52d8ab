"""The paper's own numbers (arXiv 2507.21976), for the "side by side with the paper" tables.

Transcribed from the paper's tables as printed; a report shows them next to this run's values and
never mixes the two up. Scores are the paper's LLM-judge performance scores (Qwen2.5-32B, 0-100).
"""

from __future__ import annotations

import pandas as pd

# Table 1: structured pruning by removing layers of LLaVA-1.5-7B (32 decoder layers).
TABLE_1 = pd.DataFrame(
    [
        (0, 0, 7.063, 80.12, 13.4),
        (5, 2, 6.659, 73.15, 12.5),
        (10, 4, 6.254, 65.75, 11.7),
        (20, 7, 5.647, 57.25, 10.5),
        (23, 8, 5.444, 49.50, 10.1),
        (26, 9, 5.242, 36.25, 9.7),
        (29, 10, 5.04, 27.25, 9.4),
    ],
    columns=["compression ratio (%)", "layers removed", "parameters (B)", "performance score", "VRAM (GB)"],
)

# Table 2: QLoRA SFT (r=16, alpha=8) after pruning. Its "5.6B" model scores 62.50 before SFT, which
# Table 4 lists as 5.85B ("Pruning Only", 6 layers by Table 1's per-layer count); Table 1 gives 7
# layers 57.25. See 04_sft_pruned for how our rows map.
TABLE_2 = pd.DataFrame(
    [
        ("Pruned LLaVA (5.6 B)", "2 h 42 min", 13.2, 62.50, 74.25),
        ("Pruned LLaVA (5.2 B)", "2 h 14 min", 10.8, 38.25, 52.25),
    ],
    columns=["model", "SFT time", "VRAM (GB)", "score before SFT", "score after SFT"],
).set_index("model")

# Table 3: 4-bit quantization (group size 64) after pruning and SFT; both methods need the same VRAM.
TABLE_3 = pd.DataFrame(
    [
        ("Base LLaVA (7B)", 64.72, 66.25, 4.5),
        ("Pruned LLaVA (5.6B)", 54.25, 47.25, 3.9),
        ("Pruned LLaVA (5.2B)", 36.25, 32.50, 3.7),
    ],
    columns=["model", "score AWQ", "score bitsandbytes", "VRAM (GB)"],
).set_index("model")

# Table 4: overall results.
TABLE_4 = pd.DataFrame(
    [
        ("Original LLaVA", 7.06, 16, 80.12, 154, 13.4),
        ("Pruning Only", 5.85, 16, 62.50, 148, 11.2),
        ("Pruning and SFT", 5.85, 16, 74.25, 146, 11.2),
        ("Quantization Only", 7.06, 4, 64.72, 146, 4.5),
        ("Prune + Quant", 5.85, 4, 25.00, 122, 3.9),
        ("Prune + SFT + Quant", 5.85, 4, 54.25, 122, 3.9),
    ],
    columns=["method", "parameters (B)", "bit width", "score", "latency (ms/token)", "VRAM (GB)"],
).set_index("method")

# Table 5: ablations of the full pipeline.
TABLE_5 = pd.DataFrame(
    [
        ("Full pipeline (ours)", 54.25, "Activation-aware quant + pruning + sft"),
        ("Bitsandbytes quantization", 47, "-7% accuracy drop"),
        ("Pruning Based on Magnitude Baseline", 50, "-4% accuracy drop"),
        ("Round to neighbour Quantization", 25, "unintelligible output"),
    ],
    columns=["setting", "score", "notes"],
).set_index("setting")
