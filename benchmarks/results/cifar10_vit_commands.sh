# 1. exits: a from-scratch ViT (patch 4, hidden 96, 3 heads, 6 layers, exits after layers 1, 2, 3, 4 and 6 on the CLS
#    token), trained on 90 % of CIFAR-10 train (the other 10 % is the calibration split), 10 epochs, 13-45 min on 2
#    CPU cores (13 min in this run)
HF_HUB_OFFLINE=1 .venv/bin/python scripts/train_exits.py --config_name benchmarks/configs/eenet-vit-cifar10 \
    --dataset_name ../shared/data/cifar10 --train_split "train[:90%]" --calibration_split "train[90%:]" \
    --shuffle_seed 0 --augment_train --output_dir outputs/vit-cifar10 --num_train_epochs 10 \
    --per_device_train_batch_size 128 --per_device_eval_batch_size 256 --optim adamw_torch \
    --learning_rate 1e-3 --exit_head_learning_rate 1e-3 --weight_decay 0.05 --lr_scheduler_type cosine \
    --warmup_steps 300 --eval_strategy no --save_strategy no --logging_steps 100 --report_to none --seed 42
# 2. scheduler: exit costs and each segment's fixed cost per batch measured on this CPU at batch 64, then EENet
#    (stored), the paper-faithful EENet and every baseline, fitted on the held-out 10 % of train; then the stored
#    EENet's early-exit forward timed at every budget on 20 calibration batches of 64 (in turns of 10 batches, after
#    a warm-up over them), the per-sample exit costs refitted to those times, and every policy fitted again
HF_HUB_OFFLINE=1 .venv/bin/python scripts/fit_scheduler.py --model_name_or_path outputs/vit-cifar10 \
    --dataset_name ../shared/data/cifar10 --calibration_split "train[90%:]" --shuffle_seed 0 \
    --per_device_eval_batch_size 256 --latency_costs_batch_size 64 --latency_segment_costs \
    --latency_costs_early_exit_batches 20 --timing_batches_per_turn 10 \
    --report_to none --seed 42 --output_dir outputs/vit-cifar10-eenet
# 3. test (10,000 images, shuffled: the parquet file is sorted by label, and measured batches should mix classes as
#    deployment traffic does): simulated for every policy and the oracle; every policy measured at batch 64 (2
#    threads, interleaved with the full model in turns of 10 batches) from 0.3 to 0.9, after a warm-up over every
#    test batch
HF_HUB_OFFLINE=1 .venv/bin/python scripts/evaluate_budgets.py --model_name_or_path outputs/vit-cifar10-eenet \
    --dataset_name ../shared/data/cifar10 --test_split test --shuffle_seed 0 --per_device_eval_batch_size 64 \
    --timing_batches_per_turn 10 --measured_warmup_batches 157 --report_to none --measured_policies all \
    --measured_budgets 0.3 0.35 0.4 0.5 0.6 0.7 0.8 0.9 --output_dir outputs/vit-cifar10-eenet
# 4. this report
.venv/bin/python benchmarks/report_budget_tables.py --model_dir outputs/vit-cifar10-eenet \
    --calibration_split "train[90%:]" --test_split test --title "Small ViT on CIFAR-10" \
    --commands benchmarks/results/cifar10_vit_commands.sh --output benchmarks/results/cifar10_vit.md \
    --targets cifar10-vit --notes benchmarks/results/cifar10_vit_notes.md
