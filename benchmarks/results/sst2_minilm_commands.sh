# 1. exits (one epoch of SST-2 train, 14-25 min on 2 CPU cores): mean pooling for the last exit (the MiniLM is a
#    sentence-transformers checkpoint), a learned attention over the tokens for the early exits
OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python scripts/train_exits.py --dataset_name ../shared/data/sst2 \
    --calibration_split dev --class_names negative positive --output_dir outputs/minilm-sst2 --num_train_epochs 1 \
    --per_device_train_batch_size 32 --per_device_eval_batch_size 64 --learning_rate 5e-5 \
    --exit_head_learning_rate 1e-3 --train_sampling_strategy group_by_length --max_seq_length 64 --eval_strategy no \
    --save_strategy no --logging_steps 100 --warmup_steps 100 --report_to none --seed 42 --exit_head_pooling attention
# 2. scheduler: EENet (stored), the paper-faithful EENet and every baseline, fitted on dev
HF_HUB_OFFLINE=1 .venv/bin/python scripts/fit_scheduler.py --model_name_or_path outputs/minilm-sst2 \
    --dataset_name ../shared/data/sst2 --calibration_split dev --max_seq_length 64 --per_device_eval_batch_size 64 \
    --report_to none --seed 42 --output_dir outputs/minilm-sst2-eenet
# 3. test: simulated for every policy and the oracle; measured (batch 64, 2 threads, interleaved) for every policy,
#    and EENet once more with a BudgetTracker over the test split in order
HF_HUB_OFFLINE=1 .venv/bin/python scripts/evaluate_budgets.py --model_name_or_path outputs/minilm-sst2-eenet \
    --dataset_name ../shared/data/sst2 --test_split test --max_seq_length 64 --per_device_eval_batch_size 64 \
    --report_to none --measured_policies all --measured_budgets 0.3 0.4 0.5 0.7 0.9 --tracked_policies eenet \
    --output_dir outputs/minilm-sst2-eenet
# 4. this report
.venv/bin/python benchmarks/report_budget_tables.py --model_dir outputs/minilm-sst2-eenet --calibration_split dev \
    --test_split test --title "MiniLM-L6 on SST-2" --commands benchmarks/results/sst2_minilm_commands.sh \
    --output benchmarks/results/sst2_minilm.md --notes benchmarks/results/sst2_minilm_notes.md
