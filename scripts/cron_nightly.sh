#!/usr/bin/env bash
# Nightly flowvae sweep for cron. Example crontab line (runs at 02:30, at most one instance at a time):
#
#   30 2 * * *  /path/to/flowvae/scripts/cron_nightly.sh >> /path/to/flowvae/outputs/cron.log 2>&1
#
# What makes it safe to run unattended:
# - flock: a night whose sweep is still running when the next one starts does nothing (exit 0, one line);
# - skip_existing=true (set by the seed_table preset): configs that already have an ok row are skipped, so a
#   night after a crash or a kill does only the missing cells;
# - a fixed sweep directory: a job killed mid-training (SIGTERM from `timeout`, a reboot) resumes from its
#   checkpoint the next night, because its run directory is the same;
# - the exit code is the sweep's: 0 all ok or skipped, 1 a run failed or diverged, 2 a bad configuration,
#   3 stopped by a signal (resumable). cron mails non-empty output; the log keeps every night.
set -uo pipefail

PROJECT_DIR=${PROJECT_DIR:-$(cd "$(dirname "$0")/.." && pwd)}
FLOWVAE=${FLOWVAE:-$PROJECT_DIR/.venv/bin/flowvae}
RESULTS=${RESULTS:-$PROJECT_DIR/outputs/results.csv}
SWEEP_DIR=${SWEEP_DIR:-$PROJECT_DIR/outputs/nightly}
TIME_LIMIT=${TIME_LIMIT:-6h}      # `timeout` sends SIGTERM: runs checkpoint and stop cleanly
LOCK=${LOCK:-$PROJECT_DIR/outputs/.nightly.lock}

cd "$PROJECT_DIR" || exit 2
mkdir -p "$(dirname "$LOCK")"
exec 9>"$LOCK"
if ! flock -n 9; then
    echo "$(date -Is) nightly flowvae sweep: the previous one still runs; nothing to do"
    exit 0
fi

echo "$(date -Is) nightly flowvae sweep: start"
timeout --preserve-status --signal=TERM --kill-after=2m "$TIME_LIMIT" \
    "$FLOWVAE" train -m +experiment=seed_table hydra/launcher=joblib \
    "results_csv=$RESULTS" "hydra.sweep.dir=$SWEEP_DIR" train.progress=log "$@"
status=$?
echo "$(date -Is) nightly flowvae sweep: exit code $status"
"$FLOWVAE" table "$RESULTS" --out "$PROJECT_DIR/outputs/nightly_table" >/dev/null || true
exit $status
