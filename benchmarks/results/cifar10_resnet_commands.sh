# 1. exits: a from-scratch CIFAR-stem ResNet (4 stages of 2 basic blocks, widths 16-128, an exit after every stage),
#    trained on 90 % of CIFAR-10 train (the other 10 % is the calibration split), 40 epochs. This run: on a lent
#    NVIDIA H200 in 301 s (torch 2.11.0+cu130; the data folder copied beside the repository). On 2 CPU cores the same
#    command takes ~4.5 min per epoch (an earlier 15-epoch CPU run: 67 min, 83.5 % on test).
HF_HUB_OFFLINE=1 python scripts/train_exits.py --config_name benchmarks/configs/eenet-resnet-cifar10 \
    --dataset_name ../shared/data/cifar10 --train_split "train[:90%]" --calibration_split "train[90%:]" \
    --shuffle_seed 0 --augment_train --output_dir outputs/resnet-cifar10 --num_train_epochs 40 \
    --per_device_train_batch_size 128 --per_device_eval_batch_size 256 --optim sgd \
    --optim_args "momentum=0.9,nesterov=True" --learning_rate 0.1 --exit_head_learning_rate 0.1 --weight_decay 5e-4 \
    --lr_scheduler_type cosine --warmup_steps 200 --eval_strategy no --save_strategy no --logging_steps 100 \
    --report_to none --seed 42 --dataloader_num_workers 6 --dataloader_persistent_workers
# 2. exits moved (on 2 CPU cores from here on): exit 0 from the end of stage 0 to after its first block (the rest stay
#    at the ends of stages 1 and 2, and the stock head), counted in residual blocks (`--exit_layer_unit block`); the
#    backbone and the final classifier are frozen and stay bit-identical (`--retrofit`), the exit heads train for 4
#    epochs (exit 0's head starts from the stage-0 head: same shape). ~9 min.
HF_HUB_OFFLINE=1 .venv/bin/python scripts/train_exits.py --model_name_or_path outputs/resnet-cifar10 \
    --exit_layer_unit block --exit_layers 1 4 6 8 --retrofit --dataset_name ../shared/data/cifar10 \
    --train_split "train[:90%]" --calibration_split "train[90%:]" --shuffle_seed 0 --augment_train \
    --output_dir outputs/resnet-cifar10-block --num_train_epochs 4 --per_device_train_batch_size 128 \
    --per_device_eval_batch_size 256 --optim sgd --optim_args "momentum=0.9,nesterov=True" --learning_rate 0.05 \
    --exit_head_learning_rate 0.05 --weight_decay 5e-4 --lr_scheduler_type cosine --warmup_steps 50 \
    --eval_strategy no --save_strategy no --logging_steps 50 --report_to none --seed 42
# 3. scheduler: exit costs measured on this CPU at batch 64 (so budgets are fractions of the full model's wall-clock
#    time), then EENet (stored), the paper-faithful EENet and every baseline, fitted on the held-out 10 % of train;
#    then the stored EENet's early-exit forward timed at every budget on 20 calibration batches of 64, the exit costs
#    refitted to those times, and every policy fitted again
HF_HUB_OFFLINE=1 .venv/bin/python scripts/fit_scheduler.py --model_name_or_path outputs/resnet-cifar10-block \
    --dataset_name ../shared/data/cifar10 --calibration_split "train[90%:]" --shuffle_seed 0 \
    --per_device_eval_batch_size 256 --latency_costs_batch_size 64 --latency_costs_early_exit_batches 20 \
    --report_to none --seed 42 --output_dir outputs/resnet-cifar10-block-eenet
# 4. test (10,000 images, shuffled: the parquet file is sorted by label, and measured batches should mix classes as
#    deployment traffic does): simulated for every policy and the oracle; EENet measured at batch 64 (2 threads,
#    interleaved; budget 0.25 sends 99 % of the images to exit 0 alone: what that exit costs on the clock)
HF_HUB_OFFLINE=1 .venv/bin/python scripts/evaluate_budgets.py --model_name_or_path outputs/resnet-cifar10-block-eenet \
    --dataset_name ../shared/data/cifar10 --test_split test --shuffle_seed 0 --per_device_eval_batch_size 64 \
    --report_to none --measured_budgets 0.25 0.3 0.4 0.5 0.7 --output_dir outputs/resnet-cifar10-block-eenet
# 5. this report
.venv/bin/python benchmarks/report_budget_tables.py --model_dir outputs/resnet-cifar10-block-eenet \
    --calibration_split "train[90%:]" --test_split test --title "CIFAR-stem ResNet on CIFAR-10" \
    --commands benchmarks/results/cifar10_resnet_commands.sh --output benchmarks/results/cifar10_resnet.md --targets cifar10 \
    --notes benchmarks/results/cifar10_resnet_notes.md
