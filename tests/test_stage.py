"""``ds=auto``: the ZeRO stage chosen from the world size, the model's size and the memory per rank."""

import json

from adamae_scale.engine.stage import choose_stage, model_state_bytes, recorded_ds, resolve_ds

GIB = 2**30


def test_one_rank_runs_without_zero_and_several_ranks_take_the_cheapest_stage_that_fits():
    assert choose_stage(86_000_000, 1, 80 * GIB)[0] == "zero0"
    assert choose_stage(10_000_000_000, 1, 80 * GIB)[0] == "zero0"  # one rank: sharding frees nothing
    vit_h = 632_000_000  # 16 B/param unsharded = 10 GB
    assert choose_stage(vit_h, 8, 80 * GIB)[0] == "zero0"  # 10 GB of states fit: no sharding, no bookkeeping
    # 40% of 16 GiB = 6.4 GiB: ZeRO-1 on 8 ranks needs 4+4+12/8 = 9.5 B/param = 5.6 GiB
    assert choose_stage(vit_h, 8, 16 * GIB)[0] == "zero1"
    stage, why = choose_stage(vit_h, 8, 10 * GIB)  # 4 GiB budget: ZeRO-2 (4 + 16/8 B/param = 3.5 GiB)
    assert stage == "zero2" and "8 ranks" in why and "fit" in why
    stage, why = choose_stage(vit_h, 8, 4 * GIB)  # ZeRO-3: 20/8 B/param = 1.5 GiB
    assert stage == "zero3"
    stage, why = choose_stage(vit_h, 2, 1 * GIB)  # nothing fits: ZeRO-3, and the line says what to try
    assert stage == "zero3" and "zero3_offload" in why
    for stage_index in (1, 2, 3):  # the figures the choice is based on
        total = model_state_bytes(1000, 4, stage_index)["device"]["total"]
        assert total == {1: 4000 + 4000 + 3000, 2: 4000 + 1000 + 3000, 3: 1000 + 1000 + 3000}[stage_index]


def test_an_explicit_ds_is_kept_and_a_resumed_auto_run_keeps_its_checkpoint_stage(tmp_path):
    assert resolve_ds("zero3", 1000, 1, 1) == ("zero3", None)
    assert resolve_ds("auto", 1000, 1, 1)[0] == "zero0"

    checkpoints = tmp_path / "checkpoints"
    assert recorded_ds("auto", checkpoints) is None  # nothing to resume
    tag = checkpoints / "step_00000004"
    tag.mkdir(parents=True)
    (tag / "config.json").write_text(json.dumps({"ds": "zero2", "world_size": 4}))
    (checkpoints / "latest").write_text("step_00000004")
    assert recorded_ds("auto", checkpoints) == "zero2"
    assert recorded_ds(str(tag), checkpoints) == "zero2"
    assert recorded_ds("none", checkpoints) is None
    ds, why = resolve_ds("auto", 1000, 1, 1, recorded_ds("auto", checkpoints))
    assert ds == "zero2" and "resumed checkpoint" in why
