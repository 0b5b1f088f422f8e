"""The two model families this package prunes, and what tells them apart.

DiT and SiT share one backbone, diffusers' `DiTTransformer2DModel`; they differ in how they were trained and how
they are sampled:

- ``dit``: DDPM with epsilon prediction (and learned sigma), sampled by diffusers' `DiTPipeline`;
- ``sit``: the linear flow interpolant with velocity prediction, sampled by this package's `SiTPipeline`.

A pipeline folder says which it is in ``model_index.json`` (``_class_name``), so scripts and commands can detect the
family instead of asking for it.
"""

import os

from .embedded import TINY_DIT_DIR, TINY_SIT_DIR

MODEL_TYPES = ("dit", "sit")
PIPELINE_CLASS_NAMES = {"dit": "DiTPipeline", "sit": "SiTPipeline"}
PIPELINE_COMPONENTS = ("transformer", "vae", "scheduler")  # what a DiTPipeline and a SiTPipeline are made of
PIPELINE_LAYOUT = ("model_index.json, transformer/ and vae/ (each a config.json and its weights, "
                   "diffusion_pytorch_model.safetensors) and scheduler/ (scheduler_config.json)")
DIT_NULL_CLASS = 1000  # the class diffusers' DiTPipeline guides with: hard-coded, not read from the config
EMBEDDED_BASES = {"dit": ("embedded:tiny-dit-digits", TINY_DIT_DIR), "sit": ("embedded:tiny-sit-digits", TINY_SIT_DIR)}


def check_model_type(model_type: str, argument: str = "model_type") -> str:
    if model_type not in MODEL_TYPES:
        raise ValueError(f"`{argument}` must be one of {MODEL_TYPES}, got {model_type!r}.")
    return model_type


def pipeline_class(model_type: str):
    """`DiTPipeline` for ``dit``, `SiTPipeline` for ``sit``."""
    check_model_type(model_type)
    if model_type == "sit":
        from .pipelines import SiTPipeline

        return SiTPipeline
    from diffusers import DiTPipeline

    return DiTPipeline


def load_error(argument: str, path: str, error: Exception, expected: str, folder_hint: str = "") -> OSError:
    """An `OSError` for a folder or Hub id that did not load, naming ``argument`` and the likely cause (a folder of
    another kind, a file, or a Hub id that offline mode keeps from being fetched); the caller raises it."""
    from huggingface_hub import constants

    if os.path.isdir(path):
        why = f"this folder is not {expected}{folder_hint}"
    elif os.path.exists(path):
        why = f"this is a file, not {expected}"
    elif path.startswith((os.sep, ".", "~")) or path.count("/") > 1:  # a path: a Hub id is `name` or `owner/name`
        why = f"there is no such folder; pass {expected}"
    elif constants.HF_HUB_OFFLINE:
        why = (f"not a local folder, and HF_HUB_OFFLINE is set, so the Hub was not asked for {expected} (and its "
               "cache holds no copy). Unset HF_HUB_OFFLINE to download it once, or pass a local folder")
    else:
        why = f"neither a local folder nor a Hub repository holding {expected} (check the id and the network)"
    return OSError(f"`{argument}`={path!r}: {why}. ({type(error).__name__}: {error})")


def detect_model_type(pretrained_model_name_or_path: str, revision: str | None = None,
                      argument: str = "--pretrained_model_name_or_path") -> str:
    """``dit`` or ``sit``, from the ``_class_name`` in the pipeline folder's ``model_index.json``."""
    from diffusers import DiffusionPipeline

    try:
        config = DiffusionPipeline.load_config(pretrained_model_name_or_path, revision=revision)
    except OSError as error:
        raise load_error(argument, pretrained_model_name_or_path, error, "a DiTPipeline or SiTPipeline folder",
                         " (it has no model_index.json; a transformer or UNet folder alone is not a pipeline). Pass "
                         "a pipeline folder, or convert an original DiT/SiT checkpoint with `entprune convert`"
                         ) from error
    class_name = config.get("_class_name")
    for model_type, name in PIPELINE_CLASS_NAMES.items():
        if class_name == name:
            check_pipeline_folder(pretrained_model_name_or_path, config, argument)
            return model_type
    found = f"a {class_name} folder" if class_name else "a folder whose model_index.json names no pipeline class"
    raise ValueError(f"`{argument}`={pretrained_model_name_or_path!r} is {found}; this package prunes DiTPipeline "
                     "and SiTPipeline folders. Convert an original DiT/SiT checkpoint with `entprune convert`.")


def check_pipeline_folder(path: str, config: dict, argument: str = "--pretrained_model_name_or_path") -> None:
    """Name the missing part of a DiT/SiT pipeline: diffusers reports a missing sub-folder as "no config.json" in
    the folder's root. A Hub id's index is checked; its files are fetched (and checked by diffusers) on loading."""
    class_name = config.get("_class_name")
    unlisted = [name for name in PIPELINE_COMPONENTS
                if not isinstance(config.get(name), (list, tuple)) or None in config[name]]
    if unlisted:
        raise ValueError(f"`{argument}`={path!r}: its model_index.json lists no {', '.join(unlisted)} component; a "
                         f"{class_name} needs {', '.join(PIPELINE_COMPONENTS)}. Export the pipeline again (e.g. "
                         "`entprune convert`).")
    if not os.path.isdir(path):
        return
    for name in PIPELINE_COMPONENTS:
        folder = os.path.join(path, name)
        config_name = "scheduler_config.json" if name == "scheduler" else "config.json"
        if not os.path.isdir(folder):
            problem = f"it has no `{name}/` sub-folder"
        elif not os.path.isfile(os.path.join(folder, config_name)):
            problem = f"its `{name}/` sub-folder has no {config_name}"
        elif name != "scheduler" and not any(f.endswith((".safetensors", ".bin")) for f in os.listdir(folder)):
            problem = f"its `{name}/` sub-folder has no weights (diffusion_pytorch_model.safetensors)"
        else:
            continue
        raise FileNotFoundError(f"`{argument}`={path!r} is a {class_name} folder, but {problem}. A DiT/SiT pipeline "
                                f"folder holds {PIPELINE_LAYOUT}; copy the missing part from the pipeline it came "
                                "from, or export it again.")


def check_null_class(model_type: str, source: str, revision: str | None = None,
                     argument: str = "--pretrained_model_name_or_path") -> None:
    """Refuse a DiT that `DiTPipeline` cannot sample with guidance: it guides with class 1000 whatever the model,
    so a DiT must have exactly 1000 classes (an export of one with fewer fails in sampling, one with more guides
    with a real class). `SiTPipeline` reads the null class from the config, so a SiT may have any number."""
    if check_model_type(model_type) != "dit":
        return
    from diffusers import DiTTransformer2DModel

    num_classes = DiTTransformer2DModel.load_config(source, subfolder="transformer", revision=revision).get(
        "num_embeds_ada_norm")
    if num_classes is not None and num_classes != DIT_NULL_CLASS:
        raise ValueError(f"`{argument}`={source!r} is a DiT of num_embeds_ada_norm={num_classes} classes, but "
                         f"diffusers' DiTPipeline guides with the hard-coded null class {DIT_NULL_CLASS}, so it can "
                         f"sample only DiTs of exactly {DIT_NULL_CLASS} classes, and the pruned model could not be "
                         f"sampled. Start from a DiT with {DIT_NULL_CLASS} class embeddings (a downstream dataset "
                         "of K classes trains ids 0..K-1 of them).")


def resolve_source(pretrained_model_name_or_path: str | None, model_type: str | None = None,
                   revision: str | None = None,
                   argument: str = "--pretrained_model_name_or_path") -> tuple[str, str, str]:
    """(model type, folder or Hub id to load, name for reports) of a command's base model.

    Without a path, the embedded tiny base of ``model_type`` (default ``dit``). With one, the type is read from its
    ``model_index.json``, and a ``model_type`` given as well must agree with it.
    """
    if pretrained_model_name_or_path is None:
        name, folder = EMBEDDED_BASES[check_model_type(model_type or "dit", "--model_type")]
        return model_type or "dit", folder, name
    found = detect_model_type(pretrained_model_name_or_path, revision=revision, argument=argument)
    if model_type not in (None, found):
        raise ValueError(f"`--model_type`={model_type!r} does not match {argument} "
                         f"{pretrained_model_name_or_path!r}, which is a {found} pipeline. Drop `--model_type`.")
    return found, pretrained_model_name_or_path, pretrained_model_name_or_path


def objective_for(model_type: str, transformer_config, scheduler=None):
    """The training objective of the family; learned sigma when the head has twice the input channels."""
    from .objectives import DiffusionObjective, FlowObjective  # torch: imported when needed (fast `--help`)

    learn_sigma = transformer_config.out_channels == 2 * transformer_config.in_channels
    if check_model_type(model_type) == "sit":
        return FlowObjective(learn_sigma=learn_sigma)
    if scheduler is None:
        raise ValueError("A DiT objective needs the pipeline's scheduler (its betas).")
    return DiffusionObjective.from_scheduler(scheduler, learn_sigma=learn_sigma)


def sampler_kwargs(model_type: str, sampler: str | None = None, argument: str = "--sampler") -> dict:
    """The pipeline-call arguments that choose how a family samples: ``{"sampler": sampler or "euler"}`` for a SiT
    (`SiTPipeline`), nothing for a DiT, whose `DiTPipeline` samples with its scheduler (a sampler is refused)."""
    if check_model_type(model_type) == "dit":
        if sampler is not None:
            raise ValueError(f"`{argument}` applies to SiT models only; DiT samples with its pipeline's scheduler.")
        return {}
    return {"sampler": sampler or "euler"}
