"""``voxflow predict``: segment images with trained folds (sliding window, TTA, ensembles)."""

from __future__ import annotations

import click

from voxflow._cliutil import handle_errors, parse_folds, scheduler_option


@click.command("predict")
@click.option(
    "-i",
    "--input",
    "inputs",
    multiple=True,
    required=True,
    type=click.Path(exists=True),
    help="A folder of images, image files (repeat -i), or a voxflow store.",
)
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(file_okay=False),
    help="Output folder: prediction.zarr plus one label file per case.",
)
@click.option(
    "-m",
    "--model-dir",
    "model_dirs",
    multiple=True,
    type=click.Path(exists=True),
    help="WORK/runs/<configuration> (repeat to ensemble configurations), WORK/runs with -c, or a "
    "model.zip written by `voxflow export-model`.",
)
@click.option(
    "--no-postprocessing",
    is_flag=True,
    help="Skip the model's postprocessing.json (chosen by cross-validation; applied by default). "
    "With --nnunet-model: a voxflow postprocessing.json in the model folder, if any.",
)
@click.option(
    "--nnunet-model",
    type=click.Path(exists=True, file_okay=False),
    default=None,
    help="Instead of -m: an nnU-Net v2 model folder RESULTS/DatasetXXX/TRAINER__PLANS__CONFIG.",
)
@click.option(
    "--nnunet-previous-model",
    type=click.Path(exists=True, file_okay=False),
    default=None,
    help="With a --nnunet-model cascade (3d_cascade_fullres): its 3d_lowres model folder (default: "
    "TRAINER__PLANS__3d_lowres beside it).",
)
@click.option(
    "--nnunet-checkpoint",
    default="checkpoint_final.pth",
    show_default=True,
    help="Checkpoint file name in each fold_<k> of --nnunet-model (e.g. checkpoint_best.pth).",
)
@click.option(
    "-c",
    "--configuration",
    "configurations",
    multiple=True,
    help="Configuration(s) under a WORK/runs model dir, e.g. 3d_fullres (repeatable).",
)
@click.option(
    "-f",
    "--folds",
    multiple=True,
    help="Folds to ensemble: -f 0 1 2, -f 0,1 or -f 0 -f 1 (default: every trained fold).",
)
@click.option(
    "--step",
    type=click.FloatRange(0.0, 1.0, min_open=True),
    default=0.5,
    show_default=True,
    help="Sliding-window step as a fraction of the patch size.",
)
@click.option("--no-tta", is_flag=True, help="Disable mirroring test-time augmentation (~8x faster in 3D).")
@click.option("--save-probabilities", is_flag=True, help="Also keep the class probabilities (float16) in Zarr.")
@click.option(
    "--device",
    default="cpu",
    show_default=True,
    help="cpu, cuda (every visible GPU, one process each), cuda:N or a list like cuda:0,cuda:1.",
)
@click.option(
    "--cache-mb",
    type=click.IntRange(min=16),
    default=128,
    show_default=True,
    help="Memory (MB) for partial accumulator blocks; beyond it they spill to a scratch file in OUTPUT "
    "(cheap, so peak memory stays flat for any volume).",
)
@click.option(
    "--block-mb",
    type=click.IntRange(min=1),
    default=512,
    show_default=True,
    help="With --scheduler local:N or tcp://...: memory (MB) of one block task. The volume is predicted "
    "in blocks on the workers; bigger blocks predict fewer border tiles twice.",
)
@click.option("--overwrite", is_flag=True, help="Redo cases already complete in the output.")
@click.option(
    "--output-format",
    type=click.Choice(["auto", "nifti", "nrrd", "mha", "dicom-seg"]),
    default="auto",
    show_default=True,
    help="Format of the exported label files: auto (the input's), nifti, nrrd, mha, or dicom-seg (one "
    "DICOM Segmentation per case, referencing its source series; inputs must be DICOM series).",
)
@click.option(
    "--precision",
    type=click.Choice(["auto", "fp32", "bf16", "fp16"]),
    default="auto",
    show_default=True,
    help="Forward-pass precision: auto (bf16 autocast on CUDA, fp16 where bf16 is missing; on the CPU "
    "bf16 where the processor has AVX512-BF16/AMX-BF16, fp32 elsewhere -- emulated bf16 agreed with "
    "fp32 on >= 99.98% of voxels, each case's Dice within 0.0016, on a trained hippocampus model, see "
    "README), fp32, bf16 "
    "(slow fallback kernels on CPUs without AVX512-BF16/AMX) or fp16 (CUDA). Scores are accumulated "
    "in float32.",
)
@click.option(
    "--whole-image/--sliding-window",
    "whole_image",
    default=False,
    show_default=True,
    help="One tile as large as the (preprocessed) image, rounded up to the network's stride, when it "
    "fits the forward-pass memory, instead of patch-sized tiles with --step overlap.",
)
@click.argument("more_folds", nargs=-1, metavar="[FOLD]...")
@scheduler_option
@handle_errors
def predict(
    inputs: tuple[str, ...],
    output: str,
    model_dirs: tuple[str, ...],
    configurations: tuple[str, ...],
    nnunet_model: str | None,
    nnunet_previous_model: str | None,
    nnunet_checkpoint: str,
    folds: tuple[str, ...],
    step: float,
    no_tta: bool,
    save_probabilities: bool,
    device: str,
    cache_mb: int,
    block_mb: int,
    overwrite: bool,
    output_format: str,
    more_folds: tuple[str, ...],
    scheduler: str,
    memory_limit: str | None,
    no_postprocessing: bool,
    precision: str,
    whole_image: bool,
) -> None:
    """Predict every case of INPUT with the trained folds in MODEL_DIR; write OUTPUT."""
    from voxflow.infer import PredictOptions

    fold_list = parse_folds(folds, more_folds)
    source = inputs[0] if len(inputs) == 1 else list(inputs)
    if bool(nnunet_model) == bool(model_dirs):
        raise click.UsageError("give either -m/--model-dir or --nnunet-model (exactly one).")
    if nnunet_previous_model and not nnunet_model:
        raise click.UsageError("--nnunet-previous-model goes with --nnunet-model (a cascade model folder).")
    opts = PredictOptions(
        step=step,
        tta=not no_tta,
        device=device,
        save_probabilities=save_probabilities,
        scheduler=scheduler,
        memory_limit=memory_limit,
        cache_bytes=cache_mb * 2**20,
        block_bytes=block_mb * 2**20,
        overwrite=overwrite,
        output_format=output_format,
        precision=precision,
        whole_image=whole_image,
    )
    postprocessing = None if no_postprocessing else "auto"
    if nnunet_model:
        from voxflow.nnunet import predict_nnunet

        store = predict_nnunet(
            source,
            output,
            nnunet_model,
            folds=fold_list or None,
            checkpoint=nnunet_checkpoint,
            previous_model=nnunet_previous_model,
            postprocessing=postprocessing,
            options=opts,
        )
    else:
        from voxflow.infer import predict as run_predict

        store = run_predict(
            source,
            output,
            model_dir=list(model_dirs),
            configuration=list(configurations) or None,
            folds=fold_list or None,
            postprocessing=postprocessing,
            options=opts,
        )
    click.echo(str(store.path))
