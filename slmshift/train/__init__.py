"""The conversion pipeline S2–S5: curate, cluster, select, fine-tune, register adapters."""
