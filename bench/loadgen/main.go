// Command loadgen is bench.serving's closed-loop HTTP load generator (standard library only).
//
// Each of -c workers holds one keep-alive connection and sends its next GET when the previous
// response has been read whole, taking the next path from -paths (one per line, used in order,
// shared by the workers), until -n requests were sent or -d seconds passed. It writes
//
//	{"latencies_s": [...], "elapsed_s": ..., "errors": ..., "statuses": {"200": ...}}
//
// to -o: one latency per answered request (from writing the request to the end of the body),
// grouped by worker. A request that fails at the transport level counts as an error and its
// connection is replaced; a non-200 status counts as an error but its latency is kept.
//
// It is built by bench.serving (`go build`, no modules to download) into bench/.build/.
package main

import (
	"bufio"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
)

type result struct {
	Latencies []float64      `json:"latencies_s"`
	Elapsed   float64        `json:"elapsed_s"`
	Errors    int64          `json:"errors"`
	Statuses  map[string]int `json:"statuses"`
}

func main() {
	base := flag.String("url", "", "base URL, e.g. http://127.0.0.1:8080")
	pathsFile := flag.String("paths", "", "file of request paths, one per line")
	concurrency := flag.Int("c", 16, "concurrent closed-loop workers (one connection each)")
	maxRequests := flag.Int("n", 20000, "most requests (at most the number of paths)")
	maxSeconds := flag.Float64("d", 30, "most seconds of load")
	out := flag.String("o", "-", "output JSON file (- for stdout)")
	flag.Parse()
	if *base == "" || *pathsFile == "" {
		fmt.Fprintln(os.Stderr, "loadgen: -url and -paths are required")
		os.Exit(2)
	}
	paths, err := readLines(*pathsFile)
	if err != nil {
		fmt.Fprintln(os.Stderr, "loadgen:", err)
		os.Exit(1)
	}
	if *maxRequests < len(paths) {
		paths = paths[:*maxRequests]
	}
	urls := make([]string, len(paths))
	for i, p := range paths {
		urls[i] = *base + p
	}
	transport := &http.Transport{
		Proxy:               nil,
		DialContext:         (&net.Dialer{Timeout: 5 * time.Second}).DialContext,
		MaxIdleConns:        *concurrency,
		MaxIdleConnsPerHost: *concurrency,
		MaxConnsPerHost:     *concurrency,
		DisableCompression:  true,
		IdleConnTimeout:     90 * time.Second,
	}
	client := &http.Client{Transport: transport, Timeout: 60 * time.Second}

	var next int64 = -1
	var errors int64
	lat := make([][]float64, *concurrency)
	statuses := make([]map[int]int, *concurrency)
	started := time.Now()
	deadline := started.Add(time.Duration(*maxSeconds * float64(time.Second)))
	var wg sync.WaitGroup
	for w := 0; w < *concurrency; w++ {
		wg.Add(1)
		statuses[w] = map[int]int{}
		go func(w int) {
			defer wg.Done()
			mine := make([]float64, 0, len(urls) / *concurrency + 1)
			for {
				i := atomic.AddInt64(&next, 1)
				if int(i) >= len(urls) || time.Now().After(deadline) {
					break
				}
				t0 := time.Now()
				resp, err := client.Get(urls[i])
				if err != nil {
					atomic.AddInt64(&errors, 1)
					continue
				}
				_, err = io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if err != nil {
					atomic.AddInt64(&errors, 1)
					continue
				}
				mine = append(mine, time.Since(t0).Seconds())
				statuses[w][resp.StatusCode]++
				if resp.StatusCode != http.StatusOK {
					atomic.AddInt64(&errors, 1)
				}
			}
			lat[w] = mine
		}(w)
	}
	wg.Wait()
	elapsed := time.Since(started).Seconds()
	res := result{Elapsed: elapsed, Errors: errors, Statuses: map[string]int{}}
	for w := range lat {
		res.Latencies = append(res.Latencies, lat[w]...)
		for code, n := range statuses[w] {
			res.Statuses[strconv.Itoa(code)] += n
		}
	}
	if res.Latencies == nil {
		res.Latencies = []float64{}
	}
	var sink io.Writer = os.Stdout
	if *out != "-" {
		f, err := os.Create(*out)
		if err != nil {
			fmt.Fprintln(os.Stderr, "loadgen:", err)
			os.Exit(1)
		}
		defer f.Close()
		sink = f
	}
	if err := json.NewEncoder(sink).Encode(res); err != nil {
		fmt.Fprintln(os.Stderr, "loadgen:", err)
		os.Exit(1)
	}
}

func readLines(name string) ([]string, error) {
	f, err := os.Open(name)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var lines []string
	scanner := bufio.NewScanner(f)
	for scanner.Scan() {
		if line := scanner.Text(); line != "" {
			lines = append(lines, line)
		}
	}
	return lines, scanner.Err()
}
