"""``adamae-pretrain`` unchanged, plus one thing at the end: the optimizer's fp32 master weights, gathered from
the live engine, written to ``$ADAMAE_MASTER_DUMP`` (safetensors). The ground truth for ``consolidate``.
With ``$ADAMAE_OPTIMIZER_DUMP`` set, the AdamW moments too (``NAME.exp_avg``, ``NAME.exp_avg_sq``); a resumed
run with ``train.stop_after`` equal to its resume step dumps the state exactly as it was loaded.

Run it like the CLI: ``python tests/pretrain_with_master_dump.py OVERRIDES`` or under torchrun.
"""

import os

from safetensors.torch import save_file

import adamae_scale.pretrain as pretrain


class MasterDumpingTrainer(pretrain.Trainer):
    def fit(self, stop_after=None):
        last = super().fit(stop_after)  # ends with the final checkpoint; no optimizer step follows
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        master, moments = {}, {}
        optimizer = self.engine.optimizer
        if hasattr(optimizer, "_lazy_init_hp_params_optimizer_state"):
            # DeepSpeed 0.19 (ZeRO-1/2) links each parameter to its slice of the Adam moments once, right after
            # the first param group's first update, so the other groups link to empty state; after a resume
            # it links nothing until a step. Link again now that every group has its moments.
            optimizer._hp_optimizer_states_linked = False
            optimizer._lazy_init_hp_params_optimizer_state()
        for name, param in self.engine.module.named_parameters():
            # ZeRO-1/2: gathered from the optimizer's fp32 partitions; ZeRO-3: from its fp32 flat groups
            # (collective calls: every rank walks the parameters in the same order).
            full = safe_get_full_fp32_param(param)
            if full is None:
                # No ZeRO optimizer: the client AdamW updates the module's own fp32 parameters.
                assert self.engine.zero_optimization_stage() == 0, name
                full = param
            master[name] = full.detach().cpu().clone().contiguous()
            for key in ("exp_avg", "exp_avg_sq"):
                state = safe_get_full_optimizer_state(param, key)
                if state is None:
                    state = self.engine.optimizer.state[param][key]
                moments[f"{name}.{key}"] = state.detach().cpu().clone().contiguous()
        if self.rank == 0:
            save_file(master, os.environ["ADAMAE_MASTER_DUMP"])
            if "ADAMAE_OPTIMIZER_DUMP" in os.environ:
                save_file(moments, os.environ["ADAMAE_OPTIMIZER_DUMP"])
        return last


pretrain.Trainer = MasterDumpingTrainer

if __name__ == "__main__":
    pretrain.main()
