# The ResNet of cifar10_resnet.md with every step on 2 CPU cores, glibc's allocator tuned (the scripts call
# `hf_eenet.tune_cpu_allocator` at start) and the scheduler fitted and timed in the channels-last memory format.
# 1. exits: the same command as cifar10_resnet_commands.sh step 1 (40 epochs), here on 2 CPU cores (46.5 min on an
#    otherwise idle machine)
HF_HUB_OFFLINE=1 .venv/bin/python scripts/train_exits.py --config_name benchmarks/configs/eenet-resnet-cifar10 \
    --dataset_name ../shared/data/cifar10 --train_split "train[:90%]" --calibration_split "train[90%:]" \
    --shuffle_seed 0 --augment_train --output_dir outputs/resnet-cifar10 --num_train_epochs 40 \
    --per_device_train_batch_size 128 --per_device_eval_batch_size 256 --optim sgd \
    --optim_args "momentum=0.9,nesterov=True" --learning_rate 0.1 --exit_head_learning_rate 0.1 --weight_decay 5e-4 \
    --lr_scheduler_type cosine --warmup_steps 200 --eval_strategy no --save_strategy no --logging_steps 100 \
    --report_to none --seed 42 --dataloader_num_workers 6 --dataloader_persistent_workers
# 2. exit 0 moved after the first block of stage 0, the exit heads retrained on the frozen backbone (4 epochs, ~100 s)
HF_HUB_OFFLINE=1 .venv/bin/python scripts/train_exits.py --model_name_or_path outputs/resnet-cifar10 \
    --exit_layer_unit block --exit_layers 1 4 6 8 --retrofit --dataset_name ../shared/data/cifar10 \
    --train_split "train[:90%]" --calibration_split "train[90%:]" --shuffle_seed 0 --augment_train \
    --output_dir outputs/resnet-cifar10-block --num_train_epochs 4 --per_device_train_batch_size 128 \
    --per_device_eval_batch_size 256 --optim sgd --optim_args "momentum=0.9,nesterov=True" --learning_rate 0.05 \
    --exit_head_learning_rate 0.05 --weight_decay 5e-4 --lr_scheduler_type cosine --warmup_steps 50 \
    --eval_strategy no --save_strategy no --logging_steps 50 --report_to none --seed 42
# 3. scheduler: exit costs and each segment's fixed cost per batch timed at batch 64 in the channels-last layout,
#    the per-sample costs refitted on the timed early-exit forward
HF_HUB_OFFLINE=1 .venv/bin/python scripts/fit_scheduler.py --model_name_or_path outputs/resnet-cifar10-block \
    --dataset_name ../shared/data/cifar10 --calibration_split "train[90%:]" --shuffle_seed 0 \
    --per_device_eval_batch_size 256 --latency_costs_batch_size 64 --latency_segment_costs \
    --latency_costs_early_exit_batches 20 --timing_batches_per_turn 10 --channels_last --report_to none --seed 42 \
    --output_dir outputs/resnet-cifar10-block-eenet
# 4. test (shuffled), simulated for every policy and the oracle; every policy measured at batch 64, channels-last,
#    from 0.3 to 0.9, after a warm-up over every test batch (each new survivor count builds its kernels once)
HF_HUB_OFFLINE=1 .venv/bin/python scripts/evaluate_budgets.py --model_name_or_path outputs/resnet-cifar10-block-eenet \
    --dataset_name ../shared/data/cifar10 --test_split test --shuffle_seed 0 --per_device_eval_batch_size 64 \
    --channels_last --timing_batches_per_turn 10 --measured_warmup_batches 157 --report_to none \
    --measured_policies all --measured_budgets 0.3 0.35 0.4 0.5 0.6 0.7 0.8 0.9 \
    --output_dir outputs/resnet-cifar10-block-eenet
# 5. this report
.venv/bin/python benchmarks/report_budget_tables.py --model_dir outputs/resnet-cifar10-block-eenet \
    --calibration_split "train[90%:]" --test_split test --title "CIFAR-stem ResNet on CIFAR-10, every step on 2 CPU cores" \
    --commands benchmarks/results/cifar10_resnet_cpu_commands.sh --output benchmarks/results/cifar10_resnet_cpu.md \
    --targets cifar10 --notes benchmarks/results/cifar10_resnet_cpu_notes.md
