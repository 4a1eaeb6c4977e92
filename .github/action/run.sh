#!/usr/bin/env bash
# The steps of the config-repo action (action.yml at the repository root).
#
#   run.sh install   download the released binary for this runner, check it against the
#                    release's SHA256SUMS, put it on PATH (needs gh and GH_TOKEN)
#   run.sh check     run the commands over the config repo, write one Markdown report, post it
#                    as THE pull request comment (updated in place on each push), and exit 1
#                    when the config is invalid, a test fails or head does not compile
#
# Inputs come as INPUT_* variables (see action.yml). `check` runs `$RUSTYGATE` (default:
# rustygate on PATH), so it can be tried locally against a build (tests/config_repo_action.rs).
set -euo pipefail

log() { printf '%s\n' "$*" >&2; }
die() {
  printf '::error title=rustygate action::%s\n' "$*"
  exit 2
}

install() {
  local version="${INPUT_VERSION:-latest}" repo="${INPUT_RELEASE_REPOSITORY:-}"
  [ -n "$repo" ] || repo="${ACTION_REPOSITORY:-}"
  [ -n "$repo" ] || die "no repository to download rustygate from: set the release-repository input"
  local target
  case "$(uname -m)" in
    x86_64 | amd64) target=x86_64-unknown-linux-musl ;;
    aarch64 | arm64) target=aarch64-unknown-linux-musl ;;
    *) die "no rustygate release binary for $(uname -m) runners (x86_64 and aarch64 Linux only)" ;;
  esac
  [ "$(uname -s)" = Linux ] || die "the rustygate action runs on Linux runners only"
  local tag
  if [ "$version" = latest ]; then
    tag="$(gh release view --repo "$repo" --json tagName --jq .tagName)" ||
      die "cannot find the latest release of $repo"
  else
    tag="v${version#v}"
  fi
  local dir="${RUNNER_TEMP:-/tmp}/rustygate-$tag"
  mkdir -p "$dir/bin"
  gh release download "$tag" --repo "$repo" --dir "$dir" --clobber \
    --pattern "rustygate-*-$target.tar.gz" --pattern SHA256SUMS ||
    die "cannot download rustygate $tag ($target) from $repo"
  (cd "$dir" && sha256sum --check --ignore-missing --strict SHA256SUMS) ||
    die "rustygate $tag: the download does not match the release's SHA256SUMS"
  tar -xzf "$dir"/rustygate-*-"$target".tar.gz -C "$dir/bin" --strip-components=1
  "$dir/bin/rustygate" --version
  if [ -n "${GITHUB_PATH:-}" ]; then echo "$dir/bin" >>"$GITHUB_PATH"; fi
}

# A fenced block for text that may itself hold backticks: its fence is longer than the longest
# run of backticks in the text, as `rustygate plan` picks its own (src/plan/render.rs), so no
# line of the text can close the block and write Markdown into the comment.
fenced() {
  local text longest fence
  text="$(cat "$1")"
  longest=$(printf '%s\n' "$text" | awk '{
    while (match($0, /`+/)) { if (RLENGTH > n) n = RLENGTH; $0 = substr($0, RSTART + RLENGTH) }
  } END { print n + 0 }')
  [ "$longest" -ge 2 ] || longest=2
  fence=$(printf '%*s' $((longest + 1)) '' | tr ' ' '`')
  printf '%stext\n%s\n%s\n' "$fence" "$text" "$fence"
}

# Copies files to the job log with workflow commands off: what rustygate prints there comes
# from the pull request (case names, messages), and the runner obeys a line that starts with
# `::command::` and a legacy `##[command]` anywhere in a line.
log_untrusted() {
  local token
  token="rustygate-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
  printf '::stop-commands::%s\n' "$token" >&2
  cat "$@" >&2
  # On a line of its own, whether or not the output ended with one.
  printf '\n::%s::\n' "$token" >&2
}

# At most $2 bytes of file $1, saying so when cut (a PR comment holds 65536 characters).
capped() {
  local size
  size=$(wc -c <"$1")
  if [ "$size" -gt "$2" ]; then
    head -c "$2" "$1"
    printf '\n… (%d more bytes: see the job log)\n' "$((size - $2))"
  else
    cat "$1"
  fi
}

check() {
  local rustygate="${RUSTYGATE:-rustygate}" path="${INPUT_PATH:-.}"
  local commands="${INPUT_COMMANDS:-validate,test,plan}"
  local deny="${INPUT_DENY_WARNINGS:-false}" comment="${INPUT_COMMENT:-true}"
  [ -d "$path" ] || die "path \`$path\` is not a directory in the checkout"
  local work
  work="$(mktemp -d)"
  local -a want=()
  local c
  for c in ${commands//,/ }; do
    case "$c" in
      validate | test | plan) want+=("$c") ;;
      *) die "unknown command \`$c\` in commands: use validate, test and plan" ;;
    esac
  done
  [ "${#want[@]}" -gt 0 ] || die "commands is empty: use validate, test and plan"
  local failed=0 rows="" details="" plan_md=""
  local -a deny_flag=()
  [ "$deny" = true ] && deny_flag=(--deny-warnings)

  for c in "${want[@]}"; do
    case "$c" in
      validate)
        log "::group::rustygate validate $path"
        local rc=0
        # Workflow commands on stdout: the runner shows each error on the PR's diff.
        "$rustygate" validate --no-env "${deny_flag[@]}" --format github "$path" || rc=$?
        "$rustygate" validate --no-env "${deny_flag[@]}" --format short "$path" >"$work/validate.txt" 2>&1 || true
        log "::endgroup::"
        local errors warnings
        errors=$(grep -c ': error\[' "$work/validate.txt" || true)
        warnings=$(grep -c ': warning\[' "$work/validate.txt" || true)
        if [ "$rc" -eq 0 ]; then
          rows+="| validate | ✅ valid, $warnings warning(s) |"$'\n'
        else
          failed=1
          if [ "$rc" -eq 1 ]; then
            rows+="| validate | ❌ $errors error(s), $warnings warning(s) |"$'\n'
          else
            rows+="| validate | ❌ could not run (exit $rc) |"$'\n'
          fi
        fi
        if [ -s "$work/validate.txt" ]; then
          details+="<details><summary>validate</summary>"$'\n\n'"$(fenced <(capped "$work/validate.txt" 20000))"$'\n\n'"</details>"$'\n\n'
        fi
        ;;
      test)
        log "::group::rustygate test $path"
        local rc=0
        "$rustygate" test "$path" >"$work/test.txt" 2>&1 || rc=$?
        log_untrusted "$work/test.txt"
        log "::endgroup::"
        local summary
        summary=$(grep '^test result:' "$work/test.txt" | tail -n1 || true)
        case "$rc" in
          0) rows+="| test | ✅ ${summary#test result: } |"$'\n' ;;
          1) failed=1 && rows+="| test | ❌ ${summary#test result: } |"$'\n' ;;
          *) failed=1 && rows+="| test | ❌ no test ran: the config or its tests do not compile (exit $rc) |"$'\n' ;;
        esac
        details+="<details><summary>test</summary>"$'\n\n'"$(fenced <(capped "$work/test.txt" 20000))"$'\n\n'"</details>"$'\n\n'
        ;;
      plan)
        if [ -z "${GITHUB_BASE_REF:-}" ]; then
          rows+="| plan | ➖ not a pull request |"$'\n'
          continue
        fi
        log "::group::rustygate plan $path (base origin/$GITHUB_BASE_REF)"
        git -C "$path" fetch --quiet --no-tags --depth=1 origin \
          "+refs/heads/$GITHUB_BASE_REF:refs/remotes/origin/$GITHUB_BASE_REF" ||
          log "::warning title=rustygate plan::cannot fetch origin/$GITHUB_BASE_REF; planning against what the checkout has"
        local rc=0
        "$rustygate" plan --no-env --base "origin/$GITHUB_BASE_REF" "$path" >"$work/plan.md" 2>"$work/plan.err" || rc=$?
        log_untrusted "$work/plan.md" "$work/plan.err"
        log "::endgroup::"
        case "$rc" in
          # 3: head compiles and changes what the gateway serves (the plan says what).
          0 | 3) rows+="| plan | ✅ head compiles |"$'\n' ;;
          1) failed=1 && rows+="| plan | ❌ head does not compile |"$'\n' ;;
          *) failed=1 && rows+="| plan | ❌ could not run (exit $rc): $(head -n1 "$work/plan.err") |"$'\n' ;;
        esac
        if [ "$rc" -le 1 ] || [ "$rc" -eq 3 ]; then plan_md="$(capped "$work/plan.md" 30000)"; fi
        ;;
    esac
  done

  local marker="<!-- rustygate-config-ci path=$path -->"
  local verdict="✅ all checks passed"
  [ "$failed" -eq 0 ] || verdict="❌ some checks failed"
  local run_url="${GITHUB_SERVER_URL:-https://github.com}/${GITHUB_REPOSITORY:-}/actions/runs/${GITHUB_RUN_ID:-}"
  {
    # shellcheck disable=SC2016 # Markdown backticks, not a command substitution
    printf '%s\n## RustyGate: `%s`: %s\n\n' "$marker" "$path" "$verdict"
    printf '| check | result |\n|---|---|\n%s\n' "$rows"
    if [ -n "$plan_md" ]; then printf '%s\n\n' "$plan_md"; fi
    printf '%s' "$details"
    printf '<sub>%s · [workflow run](%s)</sub>\n' "$("$rustygate" --version)" "$run_url"
  } >"$work/comment.md"

  if [ -n "${GITHUB_STEP_SUMMARY:-}" ]; then cat "$work/comment.md" >>"$GITHUB_STEP_SUMMARY"; fi
  if [ -n "${GITHUB_OUTPUT:-}" ]; then echo "report=$work/comment.md" >>"$GITHUB_OUTPUT"; fi
  if [ "$comment" = true ] && [ -n "${GITHUB_BASE_REF:-}" ]; then
    post_comment "$work/comment.md" "$marker" || log "::warning title=rustygate action::could not post the PR comment (a pull request from a fork has a read-only token); the report is in the job summary"
  fi
  exit "$failed"
}

# Creates the pull request's rustygate comment for this path, or updates the one there is.
post_comment() {
  local body="$1" marker="$2" pr
  pr=$(jq -r '.pull_request.number // empty' "${GITHUB_EVENT_PATH:-/dev/null}" 2>/dev/null || true)
  [ -n "$pr" ] || {
    log "no pull request number in the event; not commenting"
    return 0
  }
  jq -n --rawfile body "$body" '{body: $body}' >"$body.json"
  local id
  id=$(gh api --paginate "repos/$GITHUB_REPOSITORY/issues/$pr/comments" \
    --jq ".[] | select(.body | startswith($(jq -Rn --arg m "$marker" '$m'))) | .id" | head -n1)
  if [ -n "$id" ]; then
    gh api --method PATCH "repos/$GITHUB_REPOSITORY/issues/comments/$id" --input "$body.json" >/dev/null
  else
    gh api --method POST "repos/$GITHUB_REPOSITORY/issues/$pr/comments" --input "$body.json" >/dev/null
  fi
}

case "${1:-}" in
  install) install ;;
  check) check ;;
  *) die "usage: run.sh install|check" ;;
esac
