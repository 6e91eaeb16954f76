# ltoflow tasks. Run `just` to list them.
set shell := ["bash", "-euo", "pipefail", "-c"]
export PATH := justfile_directory() + "/.venv/bin:" + env_var("PATH")

demo_dir := "demo"
# Small enough tapes that the sample tree spans 3+ tapes and splits files across them.
demo_capacity_tb := "0.0000052"
demo_container_gb := "0.0006"

default:
    @just --list

# Make a sample records tree, back it up to simulated tapes, verify it, say where it all is.
demo:
    rm -rf {{demo_dir}}
    python -m ltoflow.sample {{demo_dir}}/records
    ltoflow plan --source {{demo_dir}}/records --capacity-tb {{demo_capacity_tb}} --container-size-gb {{demo_container_gb}}
    ltoflow backup --source {{demo_dir}}/records --simulator {{demo_dir}}/tapes --capacity-tb {{demo_capacity_tb}} --container-size-gb {{demo_container_gb}} --verify --state-dir {{demo_dir}}/state
    ltoflow verify --simulator {{demo_dir}}/tapes
    @echo
    @echo "Sample records: $(pwd)/{{demo_dir}}/records"
    @echo "Simulated tapes: $(pwd)/{{demo_dir}}/tapes (one directory per tape: data/, catalog/, recovery/)"

# Every check CI runs: tests, strict typing, lint.
test:
    pytest -q
    mypy --strict ltoflow ltoflow_command.py tests
    ruff check .

# Benchmarks against the tar | tee | openssl floor (see bench/README.md).
bench *args:
    pip install --quiet -e ".[bench]"
    python bench/run.py {{args}}
