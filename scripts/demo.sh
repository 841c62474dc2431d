#!/usr/bin/env bash
# make demo: a real 3-node bdr group on 127.0.0.1, formed and exercised through SQL.
#   scripts/demo.sh start DIR   (after `make install`)
#   scripts/demo.sh stop DIR
set -euo pipefail
cmd=${1:-start}
dir=${2:-$(pwd)/.demo}
cd "$(dirname "$0")/.."

# As root, the servers run as the postgres OS user, which must be able to reach the data
# directory: a checkout under /root (mode 700) is out of its reach, so the cluster then
# lives in /tmp/bdr-demo (start and stop pick the same place).
if [ "$(id -u)" = 0 ] && ! runuser -u postgres -- test -x "$(dirname "$dir")" 2>/dev/null; then
  [ "$cmd" = stop ] || echo "note: the postgres OS user cannot reach $(dirname "$dir"); the demo cluster goes to /tmp/bdr-demo"
  dir=/tmp/bdr-demo
fi
say() { printf '\n\033[1;32m==> %s\033[0m\n' "$*"; }

echo "building the cluster tool..."
cargo build -q -p pg_test --bin bdr-cluster
tool=target/debug/bdr-cluster

if [ "$cmd" = stop ]; then
  say "stopping the demo cluster in $dir"
  "$tool" stop --dir "$dir"
  exit 0
fi

if [ -f "$dir/nodes.txt" ]; then
  say "stopping the previous demo cluster"
  "$tool" stop --dir "$dir" || true
fi
say "starting 3 PostgreSQL 15 nodes with bdr preloaded (in $dir)"
"$tool" start --dir "$dir" --nodes 3 --base-port 5501 --dbname bdrdemo

port() { awk -v n="$1" '$1==n {print $2}' "$dir/nodes.txt"; }
dsn() { echo "host=127.0.0.1 port=$(port "$1") dbname=bdrdemo user=postgres"; }
sql() { local n=$1; shift; psql -X -q -v ON_ERROR_STOP=1 "$(dsn "$n")" "$@"; }

say "CREATE EXTENSION bdr on every node; a table on node1 (joins copy the schema)"
for n in node1 node2 node3; do sql "$n" -c "CREATE EXTENSION bdr"; done
sql node1 -c "CREATE TABLE accounts (id int PRIMARY KEY, owner text, balance numeric, updated_on text)"

say "forming the group: group_create on node1, group_join on node2 and node3"
sql node1 -c "SELECT bdr.group_create(local_node_name := 'node1', node_external_dsn := '$(dsn node1)')"
for n in node2 node3; do
  sql "$n" -c "SELECT bdr.group_join(local_node_name := '$n', node_external_dsn := '$(dsn $n)', join_using_dsn := '$(dsn node1)')"
  sql "$n" -c "SELECT bdr.wait_for_join()"
done
sql node1 -c "SELECT node_name, node_kind, node_state, node_id FROM bdr.nodes ORDER BY node_name"

say "writing one row on each node"
sql node1 -c "INSERT INTO accounts VALUES (1, 'alice', 100, 'node1')"
sql node2 -c "INSERT INTO accounts VALUES (2, 'bob',   200, 'node2')"
sql node3 -c "INSERT INTO accounts VALUES (3, 'carol', 300, 'node3')"
sql node2 -c "UPDATE accounts SET balance = balance + 1, updated_on = 'node2' WHERE id = 1"
for n in node1 node2 node3; do sql "$n" -c "SELECT bdr.wait_for_join(60)"; done

for n in node1 node2 node3; do
  say "rows on $n"
  sql "$n" -c "SELECT * FROM accounts ORDER BY id"
done

say "apply workers on node1 (one per peer)"
sql node1 -c "SELECT peer, state, applied_lsn, last_error FROM bdr.apply_workers() ORDER BY peer"

cat <<MSG

The cluster keeps running. Connect with:
  psql "$(dsn node1)"
  psql "$(dsn node2)"
  psql "$(dsn node3)"
Stop it with:  make demo-stop
MSG
