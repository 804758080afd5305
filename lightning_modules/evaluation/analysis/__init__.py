"""How adversarial examples break a model (Xu et al., Medical Image Analysis 2021), in plain
PyTorch, NumPy and scikit-learn: ``features`` (intermediate activations, relative distance
clean vs adversarial per stage, penultimate features), ``discriminability`` (t-SNE, silhouette,
linear probe), ``labels`` (finding co-occurrence and correlation of predictions), ``report``
(all of them on one set of test images, with figures, or some by name: ``ANALYSES``),
``corruption`` (scores under common corruptions, mCE, flip probability)."""

from lightning_modules.evaluation.analysis.discriminability import discriminability, tsne_2d
from lightning_modules.evaluation.analysis.features import (
           feature_stages,
           penultimate_features,
           relative_feature_distance,
)
from lightning_modules.evaluation.analysis.labels import (
           cooccurrence,
           correlation_distance,
           prediction_correlation,
)
from lightning_modules.evaluation.analysis.run import ANALYSES, run_analyses

__all__ = ["ANALYSES", "cooccurrence", "correlation_distance", "discriminability", "feature_stages",
           "penultimate_features", "prediction_correlation", "relative_feature_distance",
           "run_analyses", "tsne_2d"]
