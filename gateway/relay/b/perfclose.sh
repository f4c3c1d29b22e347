#!/bin/bash
# perf cpu-clock split per process under wrk Connection: close, one proxy at a time.
set -u
D=/tmp/l4gw-conncost-o7gn9ys4
cd $D
setsid nginx -c $D/nginx.conf -p $D </dev/null >/dev/null 2>&1 &
sleep 0.5
setsid haproxy -f haproxy.cfg -db > hap.log 2>&1 < /dev/null &
setsid /work/main/.venv/bin/python /work/main/bench/uvloop_proxy.py 50994 33895 > uv.log 2>&1 < /dev/null &
setsid /work/main/.venv/bin/python -m gateway.cli run -c gateway-copy.toml > gwc.log 2>&1 < /dev/null &
setsid /work/main/.venv/bin/python -m gateway.cli run -c gateway-default.toml > gwd.log 2>&1 < /dev/null &
sleep 4
for t in copy:50991 default:50993 hap:50992 uv:50994; do
  IFS=: read name port <<< "$t"
  pid=$(ss -ltnpH "sport = :$port" | grep -o 'pid=[0-9]*' | head -1 | cut -d= -f2)
  timeout 20 wrk -c 50 -t 2 -d 9s -H 'Connection: close' http://127.0.0.1:$port/ > wrkc-$name.txt 2>&1 &
  sleep 2
  perf record -q -e cpu-clock -g -p $pid -o perfc-$name.data -- sleep 5 >/dev/null 2>&1
  wait
  echo "$name pid=$pid $(grep Requests/sec wrkc-$name.txt)"
  perf report -i perfc-$name.data --no-children --sort dso --stdio -q -g none 2>/dev/null | head -6
done
pkill -f "gateway.cli run -c gateway-(copy|default).toml"; pkill -f uvloop_proxy.py; pkill -x haproxy
pkill -f "nginx: master process nginx -c $D"
