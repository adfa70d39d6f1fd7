"""``adamae-pretrain`` unchanged, plus one thing at the end: the optimizer's fp32 master weights, gathered from
the live engine, written to ``$ADAMAE_MASTER_DUMP`` (safetensors). The ground truth for ``consolidate``.

Run it like the CLI: ``python tests/pretrain_with_master_dump.py OVERRIDES`` or under torchrun.
"""
import os

import adamae_scale.pretrain as pretrain
from safetensors.torch import save_file


class MasterDumpingTrainer(pretrain.Trainer):
    def fit(self, stop_after=None):
        last = super().fit(stop_after)  # ends with the final checkpoint; no optimizer step follows
        from deepspeed.utils import safe_get_full_fp32_param

        master = {}
        for name, param in self.engine.module.named_parameters():
            # ZeRO-1/2: gathered from the optimizer's fp32 partitions; ZeRO-3: from its fp32 flat groups
            # (collective calls: every rank walks the parameters in the same order).
            full = safe_get_full_fp32_param(param)
            if full is None:
                # No ZeRO optimizer: the client AdamW updates the module's own fp32 parameters.
                assert self.engine.zero_optimization_stage() == 0, name
                full = param
            master[name] = full.detach().cpu().clone().contiguous()
        if self.rank == 0:
            save_file(master, os.environ["ADAMAE_MASTER_DUMP"])
        return last


pretrain.Trainer = MasterDumpingTrainer

if __name__ == "__main__":
    pretrain.main()
