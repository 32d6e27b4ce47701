"""Looking inside adapters: spectra, effective rank, subspace similarity, intruder dimensions.

    from loraforge.analysis import analyze, intruders, mitigate
    found = intruders(base_model, "runs/x/adapter", k=10, epsilon=0.5)   # {module: Intruders}
    mitigate(base_model, "runs/x/adapter", "runs/x/adapter-mitigated", lam=0.75)

Matrix-level maths lives in `spectra` (singular values, effective rank, subspace similarity) and
`intruder_dims` (detection, mitigation); `weights` turns an adapter folder, a folder of full fine-tuned
weights or an attached adapter into (W0, dW) pairs one module at a time; `model` runs the maths over
a whole model; `report` writes report.md / report.json / PNGs; `cli` is `loraforge analyze`.
"""

from loraforge.analysis.intruder_dims import (
    Intruders,
    count_intruders,
    find_intruders,
    intruder_scores,
    low_rank_factors,
    mitigated_update,
)
from loraforge.analysis.model import ModuleAnalysis, adapter_similarity, analyze, intruders, mitigate
from loraforge.analysis.report import write_report
from loraforge.analysis.spectra import effective_rank, singular_values, subspace_similarity
from loraforge.analysis.weights import open_updates

__all__ = [
    "Intruders", "ModuleAnalysis", "adapter_similarity", "analyze", "count_intruders", "effective_rank",
    "find_intruders", "intruder_scores", "intruders", "low_rank_factors", "mitigate", "mitigated_update",
    "open_updates", "singular_values", "subspace_similarity", "write_report",
]
