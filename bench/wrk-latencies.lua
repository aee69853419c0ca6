-- wrk script for bench/load.py: after the run, print every latency that wrk
-- recorded, as (microseconds, count) pairs of its histogram, so that the
-- slices of one row can be combined into exact percentiles.
function done(summary, latency, requests)
  io.write("latency histogram:\n")
  for index = 1, #latency do
    local microseconds, count = latency(index)
    io.write(string.format("%d %d\n", microseconds, count))
  end
end
