"""The paper's ablations and the companion studies: interpretability (Figure 6), per-latent stability,
splicing, live-only statistics, the random-model control, subspaces, synthetic ground truth, pooling."""
