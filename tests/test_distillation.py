"""Knowledge distillation (diffusers_entprune/distillation.py) and its flags in examples/prune_dit.py."""

import copy
import json
import os
import shutil

import pytest
import torch
from conftest import make_scheduler, make_tiny_dit
from test_cli import source_pipeline  # noqa: F401  (fixture)
from test_prune_dit_script import fresh_accelerator_state, run_prune_script, tiny_args, weights  # noqa: F401  (fixture)

from diffusers_entprune.distillation import (
    DistillationConfig,
    Distiller,
    Teacher,
    capture_hidden_states,
    check_teacher_config,
    feature_distillation_loss,
    outlier_mask,
    output_distillation_loss,
)
from diffusers_entprune.embedded import TINY_SIT_DIR
from diffusers_entprune.models import EntPrunedTransformer2DModel
from diffusers_entprune.objectives import DiffusionObjective, FlowObjective
from diffusers_entprune.run_identity import RunMismatchError, compare_run_identity


def student_and_teacher(num_layers=4, seed=0):
    student = EntPrunedTransformer2DModel.from_transformer(make_tiny_dit(num_layers=num_layers, seed=seed))
    return student, Teacher(copy.deepcopy(student))


def batch(objective, size=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0, noise = torch.randn(size, 4, 8, 8, generator=g), torch.randn(size, 4, 8, 8, generator=g)
    noised = objective.add_noise(x0, noise, torch.tensor([5, 400, 999])[:size])
    return x0, noised, torch.tensor([1, 7, 1000])[:size]


def distil_step(distiller, student, objective, step=0):
    x0, noised, labels = batch(objective)
    with distiller.capture(student, step) as hidden:
        output = student(noised.noisy, timestep=noised.timesteps, class_labels=labels).sample
    return distiller.loss(objective, output.float(), x0, noised, labels, hidden, step), hidden


# ---------------------------------------------------------------------------------------------- config


def test_config_validation_names_the_option():
    for kwargs, name in [({"output_weight": 1.5}, "output_weight"), ({"output_weight": float("nan")}, "output_weight"),
                         ({"feature_weight": -1.0}, "feature_weight"), ({"feature_weight": float("inf")},
                                                                        "feature_weight"),
                         ({"feature_decay_steps": -1}, "feature_decay_steps"),
                         ({"feature_decay_steps": 2.5}, "feature_decay_steps"), ({"mask_sigma": -0.1}, "mask_sigma")]:
        with pytest.raises(ValueError, match=f"`{name}`"):
            DistillationConfig(**kwargs)
    assert not DistillationConfig().enabled and DistillationConfig(output_weight=0.3).enabled
    with pytest.raises(ValueError, match="off"):
        Distiller(DistillationConfig(), student_and_teacher()[1])


def test_feature_weight_decays_linearly_to_zero():
    config = DistillationConfig(feature_weight=2.0, feature_decay_steps=10)
    assert [config.feature_weight_at(s) for s in (0, 5, 10, 50)] == [2.0, 1.0, 0.0, 0.0]
    assert config.needs_teacher(9) and not config.needs_teacher(10)  # the teacher stops once nothing needs it
    assert DistillationConfig(output_weight=0.5, feature_weight=2.0, feature_decay_steps=10).needs_teacher(10)
    assert DistillationConfig(feature_weight=2.0).feature_weight_at(10**6) == 2.0  # 0: no decay


# ---------------------------------------------------------------------------------------------- loss terms


@pytest.mark.parametrize("pruned", [[], [1, 2]])
def test_teacher_equal_to_student_gives_exactly_zero_distillation_loss(pruned):
    student, teacher = student_and_teacher()
    if pruned:  # a pruned teacher and student with the same blocks
        student.prune_blocks(pruned)
        teacher.model.prune_blocks(pruned)
    objective = DiffusionObjective.from_scheduler(make_scheduler())
    distiller = Distiller(DistillationConfig(output_weight=0.5, feature_weight=1.0, feature_decay_steps=100), teacher)
    loss, hidden = distil_step(distiller, student, objective)
    logs = distiller.end_step()
    assert sorted(hidden) == student.kept_block_indices == distiller.feature_blocks
    assert logs["loss/distill_output"] == 0.0 and logs["loss/distill_feature"] == 0.0
    x0, noised, labels = batch(objective)
    ground_truth = objective.loss(student(noised.noisy, timestep=noised.timesteps, class_labels=labels).sample,
                                  x0, noised)
    assert torch.allclose(loss, 0.5 * ground_truth)  # (1 - w) * ground truth + w * 0 + beta * 0


def test_mask_drops_planted_outliers():
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(2, 16, 32, generator=g)
    student = teacher + 0.1 * torch.randn(2, 16, 32, generator=g)
    teacher[0, 3, 5] = teacher[0, 9, 5] = teacher[1, 0, 7] = 500.0  # massive activations the student lacks
    keep = outlier_mask(teacher, 2.0)
    assert not keep[0, 3, 5] and not keep[0, 9, 5] and not keep[1, 0, 7]
    assert keep.float().mean() > 0.9  # a 2-sigma rule on the rest drops about 5%
    masked = feature_distillation_loss({4: student}, {4: teacher}, mask_sigma=2.0)
    unmasked = feature_distillation_loss({4: student}, {4: teacher}, mask_sigma=0.0)
    # masked: the student's small error relative to the teacher's spread (0.1^2 / ~1); unmasked: the outliers
    assert (masked < 0.02).all() and (unmasked > 0.5).all()
    clean = feature_distillation_loss({4: student}, {4: torch.where(keep, teacher, student)}, mask_sigma=0.0)
    assert (masked < 2 * clean).all()  # the same order as if the outliers had never been there


def test_feature_loss_is_normalised_per_layer_and_matches_common_blocks_only():
    g = torch.Generator().manual_seed(0)
    teacher = {1: torch.randn(2, 4, 8, generator=g), 3: 100 * torch.randn(2, 4, 8, generator=g)}
    student = {1: teacher[1] + 0.1, 3: teacher[3] + 10.0, 5: torch.zeros(2, 4, 8)}  # the same relative error
    per_layer = [feature_distillation_loss({k: student[k]}, {k: teacher[k]}, 0.0) for k in (1, 3)]
    for loss, k, shift in zip(per_layer, (1, 3), (0.1, 10.0)):  # MSE / the teacher's variance, per sample
        assert torch.allclose(loss, shift**2 / teacher[k].var(dim=(1, 2), correction=0), rtol=1e-4)
    assert torch.allclose(per_layer[0], per_layer[1], rtol=0.2)  # 100x larger activations weigh the same
    both = feature_distillation_loss(student, teacher, 0.0)  # block 5 is the student's only: left out
    assert torch.allclose(both, (per_layer[0] + per_layer[1]) / 2)
    with pytest.raises(ValueError, match="no original index in common"):
        feature_distillation_loss({5: student[5]}, teacher)


def test_output_term_covers_learned_sigma_for_dit_and_only_velocity_for_sit():
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(2, 8, 8, 8, generator=g)
    other_variance = teacher.clone()
    other_variance[:, 4:] += 1.0  # the learned-variance half differs
    other_prediction = teacher.clone()
    other_prediction[:, :4] += 1.0
    dit = DiffusionObjective.from_scheduler(make_scheduler(), learn_sigma=True)
    assert torch.allclose(output_distillation_loss(other_variance, teacher, dit), torch.full((2,), 0.5))
    assert torch.allclose(output_distillation_loss(other_prediction, teacher, dit), torch.full((2,), 0.5))
    sit = FlowObjective(learn_sigma=True)
    assert torch.equal(output_distillation_loss(other_variance, teacher, sit), torch.zeros(2))
    assert torch.allclose(output_distillation_loss(other_prediction, teacher, sit), torch.ones(2))


# ---------------------------------------------------------------------------------------------- teacher and student


@pytest.mark.parametrize("checkpointing", [False, True])
def test_gradients_reach_the_student_only(checkpointing):
    student, _ = student_and_teacher()
    teacher = Teacher(EntPrunedTransformer2DModel.from_transformer(make_tiny_dit(num_layers=4, seed=1)))
    student.prune_blocks([2])
    student.train()
    if checkpointing:
        student.enable_gradient_checkpointing()
    objective = DiffusionObjective.from_scheduler(make_scheduler())
    distiller = Distiller(DistillationConfig(output_weight=1.0, feature_weight=1.0), teacher)
    loss, hidden = distil_step(distiller, student, objective)
    assert all(h.requires_grad for h in hidden.values())  # captured inside the graph, checkpointed or not
    loss.mean().backward()
    assert all(not p.requires_grad and p.grad is None for p in teacher.model.parameters())
    assert not teacher.model.training
    assert all(p.grad is not None and p.grad.abs().sum() > 0
               for block in student.transformer_blocks for p in block.ff.parameters())
    assert all(not b._forward_hooks for b in student.transformer_blocks)  # hooks are gone after the forward
    assert all(not b._forward_hooks for b in teacher.model.transformer_blocks)


def test_gradient_checkpointing_does_not_change_the_distillation_gradient():
    grads = []
    for checkpointing in (False, True):
        student, _ = student_and_teacher()
        teacher = Teacher(EntPrunedTransformer2DModel.from_transformer(make_tiny_dit(num_layers=4, seed=1)))
        student.train()
        if checkpointing:
            student.enable_gradient_checkpointing()
        distiller = Distiller(DistillationConfig(feature_weight=1.0), teacher)
        loss, _ = distil_step(distiller, student, DiffusionObjective.from_scheduler(make_scheduler()))
        loss.mean().backward()
        grads.append(student.transformer_blocks[0].ff.net[2].weight.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_hooks_follow_pruning_and_wrappers():
    student, _ = student_and_teacher()
    wrapper = torch.nn.Module()
    wrapper.module = student  # like DistributedDataParallel
    x, t, y = torch.randn(1, 4, 8, 8), torch.tensor([3]), torch.tensor([2])
    student.prune_blocks([0, 3])
    with capture_hidden_states(wrapper) as hidden:
        student(x, timestep=t, class_labels=y)
    assert sorted(hidden) == [1, 2]
    with student.skipping([1]), capture_hidden_states(student) as hidden:
        student(x, timestep=t, class_labels=y)
    assert sorted(hidden) == [2]  # a skipped block does not run, so it has no hidden state


def test_teacher_must_fit_the_student():
    student = EntPrunedTransformer2DModel.from_transformer(make_tiny_dit(num_layers=4))
    config = dict(student.config)
    check_teacher_config(config, config, features=True)
    with pytest.raises(ValueError, match=r"`--teacher`.*out_channels 4 \(the student's: 8\)"):
        check_teacher_config({**config, "out_channels": 4}, config, features=False, argument="--teacher")
    deeper = {**config, "num_layers": 6}
    check_teacher_config(deeper, config, features=False)  # the output term does not care about depth
    with pytest.raises(ValueError, match="6 blocks originally.*drop the hidden-state term"):
        check_teacher_config(deeper, config, features=True)
    pruned = {**config, "num_layers": 2, "_entprune_kept_block_indices": [0, 1], "_entprune_original_num_layers": 4}
    student.prune_blocks([0, 1])
    teacher = Teacher(EntPrunedTransformer2DModel.from_transformer(make_tiny_dit(num_layers=4)))
    teacher.model.prune_blocks([2, 3])
    assert dict(teacher.model.config)["_entprune_kept_block_indices"] == pruned["_entprune_kept_block_indices"]
    with pytest.raises(ValueError, match="none of which the student has"):
        teacher.check_fits(student, features=True)
    teacher.check_fits(student, features=False)


def test_teacher_runs_under_the_students_autocast_and_is_timed():
    _, teacher = student_and_teacher()
    teacher.autocast_dtype = torch.bfloat16
    out = teacher(torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), torch.tensor([3, 4]), capture_features=True)
    assert out.sample.dtype == torch.bfloat16 and sorted(out.hidden_states) == [0, 1, 2, 3]
    assert len(teacher.seconds) == 1 and teacher.seconds[0] > 0


def test_identity_refuses_another_teacher_on_resume():
    saved = {"settings": {"teacher_model_name_or_path": "/old/teacher"}, "source_weights_sha256": "s",
             "dataset": {}, "teacher_weights_sha256": "a" * 64}
    moved = {**saved, "settings": {"teacher_model_name_or_path": "/new/place"}}
    assert compare_run_identity(saved, moved, "ckpt") == {"teacher_model_name_or_path": ["/old/teacher",
                                                                                         "/new/place"]}
    with pytest.raises(RunMismatchError, match="distillation teacher weights"):
        compare_run_identity(saved, {**moved, "teacher_weights_sha256": "b" * 64}, "ckpt")


# ---------------------------------------------------------------------------------------------- the script


KD = ["--distill_output_weight", "0.5", "--distill_feature_weight", "1.0", "--validation_steps", "0",
      "--speed_batch_size", "0"]


def test_script_distils_end_to_end_and_reports_the_teacher(tmp_path, source_pipeline, monkeypatch):  # noqa: F811
    from accelerate import Accelerator

    logged = []
    real_log = Accelerator.log
    monkeypatch.setattr(Accelerator, "log", lambda self, values, step=None, **kw: (
        logged.append((step, dict(values))), real_log(self, values, step=step, **kw))[1])
    out = tmp_path / "out"
    run_prune_script(tiny_args(source_pipeline, out, *KD, "--gradient_checkpointing"))
    entry = json.load(open(out / "entprune_report.json"))["distillation"]
    assert entry["output_weight"] == 0.5 and entry["feature_weight"] == 1.0 and entry["mask_sigma"] == 2.0
    assert entry["feature_decay_steps"] == 12  # default: --max_train_steps
    assert entry["teacher"].endswith("(the source model)") and len(entry["teacher_weights_sha256"]) == 64
    assert entry["teacher_steps"] == 12 and 0 < entry["median_teacher_seconds_per_step"] < \
        entry["median_step_seconds_with_teacher"]
    assert entry["feature_blocks"] == json.load(open(out / "entprune_report.json"))["kept_block_indices"]
    steps = [values for _, values in logged if "loss" in values]
    assert len(steps) == 12
    assert all({"loss/ground_truth", "loss/distill_output", "loss/distill_feature"} <= set(v) for v in steps)
    assert [v["distill/feature_weight"] for v in steps] == pytest.approx([1 - s / 12 for s in range(12)])
    assert all(v["loss/distill_output"] > 0 and v["loss/distill_feature"] > 0 for v in steps)  # pruned at step 0


def test_script_distils_with_lora_and_bf16(tmp_path, source_pipeline):  # noqa: F811
    out = tmp_path / "out"
    run_prune_script(tiny_args(source_pipeline, out, *KD, "--use_lora", "--lora_rank", "2", "--mixed_precision",
                             "bf16"))
    report = json.load(open(out / "entprune_report.json"))
    assert report["distillation"]["teacher_steps"] == 12 and len(report["kept_block_indices"]) == 3


def test_resume_reloads_the_teacher_and_refuses_other_distillation_settings(tmp_path, source_pipeline):  # noqa: F811
    teacher = tmp_path / "teacher"
    shutil.copytree(source_pipeline, teacher)
    extra = [*KD, "--teacher_model_name_or_path", str(teacher), "--distill_feature_decay_steps", "12"]
    run_prune_script(tiny_args(source_pipeline, tmp_path / "whole", *extra))
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(tmp_path / "whole" / "checkpoint-6", resumed / "checkpoint-6")
    changed = [a if a != "1.0" else "2.0" for a in extra]  # another --distill_feature_weight
    with pytest.raises(RunMismatchError, match=r"--distill_feature_weight: 1\.0 -> 2\.0"):
        run_prune_script(tiny_args(source_pipeline, resumed, *changed, "--resume_from_checkpoint", "latest"))
    moved = tmp_path / "moved-teacher"
    teacher.rename(moved)  # the same weights elsewhere: allowed, and the run ends as if never stopped
    extra[extra.index(str(teacher))] = str(moved)
    run_prune_script(tiny_args(source_pipeline, resumed, *extra, "--resume_from_checkpoint", "latest"))
    a, b = weights(tmp_path / "whole"), weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("extra, error, match", [
    (["--teacher_model_name_or_path", "{empty}"], OSError, "teacher_model_name_or_path.*not a DiTPipeline"),
    (["--teacher_model_name_or_path", TINY_SIT_DIR], ValueError, "teacher_model_name_or_path.*sit pipeline"),
    # the embedded DiT: same latents and classes (the output term fits) but 12 blocks of width 96, not 6 of 16
    (["--teacher_model_name_or_path", "embedded", "--distill_feature_weight", "1"], ValueError,
     "teacher_model_name_or_path.*hidden size 96"),
    (["--teacher_model_name_or_path", "{source}"], SystemExit, None),  # without distillation
    (["--distill_output_weight", "1.5"], SystemExit, None),
    (["--distill_output_weight", "0.5", "--distill_mask_sigma", "3"], SystemExit, None),  # no feature term
])
def test_bad_distillation_input_is_refused_before_anything_is_written(tmp_path, source_pipeline,  # noqa: F811
                                                                      extra, error, match):
    from diffusers_entprune.embedded import TINY_DIT_DIR

    (tmp_path / "empty").mkdir()
    extra = [{"{empty}": str(tmp_path / "empty"), "{source}": source_pipeline, "embedded": TINY_DIT_DIR}.get(a, a)
             for a in extra]
    if "--teacher_model_name_or_path" in extra and "--distill_output_weight" not in extra and match:
        extra = ["--distill_output_weight", "0.5", *extra]
    out = tmp_path / "out"
    with pytest.raises(error, match=match):
        run_prune_script(tiny_args(source_pipeline, out, *extra))
    assert not out.exists()


def test_teacher_inside_the_output_dir_is_refused(tmp_path, source_pipeline):  # noqa: F811
    out = tmp_path / "out"
    shutil.copytree(source_pipeline, out / "teacher")
    with pytest.raises(ValueError, match="teacher_model_name_or_path"):
        run_prune_script(tiny_args(source_pipeline, out, "--distill_output_weight", "0.5",
                                 "--teacher_model_name_or_path", str(out / "teacher"), "--overwrite_output_dir"))
    assert os.path.isdir(out / "teacher")
