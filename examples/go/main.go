// A minimal deepe client in Go, with the standard library only: submit a job, follow its
// events over Server-Sent Events (resuming after a dropped connection), and print the result.
//
//	DEEPE_API=http://127.0.0.1:8000 DEEPE_API_TOKEN=... go run . sft-demo models/base data/train.jsonl
package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"strings"
	"time"
)

type event struct {
	Kind     string         `json:"kind"`
	Step     *int           `json:"step"`
	MaxSteps *int           `json:"max_steps"`
	Metrics  map[string]any `json:"metrics"`
	Message  string         `json:"message"`
}

var final = map[string]bool{"succeeded": true, "failed": true, "cancelled": true}

func request(method, path string, body any, lastID string) (*http.Response, error) {
	var buf bytes.Buffer
	if body != nil {
		if err := json.NewEncoder(&buf).Encode(body); err != nil {
			return nil, err
		}
	}
	req, err := http.NewRequest(method, os.Getenv("DEEPE_API")+path, &buf)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Authorization", "Bearer "+os.Getenv("DEEPE_API_TOKEN"))
	req.Header.Set("Content-Type", "application/json")
	if lastID != "" {
		req.Header.Set("Last-Event-ID", lastID)
	}
	return http.DefaultClient.Do(req)
}

// follow reads events until the job ends; it returns the last event id it saw.
func follow(jobID, lastID string) (string, bool, error) {
	resp, err := request("GET", "/jobs/"+jobID+"/events", nil, lastID)
	if err != nil {
		return lastID, false, err
	}
	defer resp.Body.Close()
	scanner := bufio.NewScanner(resp.Body)
	scanner.Buffer(make([]byte, 1<<20), 1<<20)
	var id string
	for scanner.Scan() {
		line := scanner.Text()
		switch {
		case strings.HasPrefix(line, "id: "):
			id = strings.TrimPrefix(line, "id: ")
		case strings.HasPrefix(line, "data: "):
			var e event
			if err := json.Unmarshal([]byte(strings.TrimPrefix(line, "data: ")), &e); err != nil {
				return lastID, false, err
			}
			lastID = id
			if e.Kind == "log" && e.Step != nil && e.MaxSteps != nil {
				fmt.Printf("step %d/%d loss %v\n", *e.Step, *e.MaxSteps, e.Metrics["loss"])
			} else {
				fmt.Printf("%s %s\n", e.Kind, e.Message)
			}
			if final[e.Kind] {
				return lastID, true, nil
			}
		}
	}
	return lastID, false, scanner.Err()
}

func main() {
	if len(os.Args) != 4 {
		fmt.Fprintln(os.Stderr, "usage: main METHOD MODEL_PATH DATASET_PATH")
		os.Exit(2)
	}
	resp, err := request("POST", "/jobs", map[string]any{
		"method": os.Args[1],
		"params": map[string]any{"MODEL_PATH": os.Args[2], "DATASET_PATH": os.Args[3], "MAX_STEPS": 30},
	}, "")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	var created struct {
		ID     string `json:"id"`
		Detail string `json:"detail"`
	}
	json.NewDecoder(resp.Body).Decode(&created)
	resp.Body.Close()
	if resp.StatusCode != http.StatusCreated {
		fmt.Fprintf(os.Stderr, "refused (%d): %s\n", resp.StatusCode, created.Detail)
		os.Exit(2)
	}
	fmt.Println("job", created.ID)
	lastID := ""
	for {
		var done bool
		lastID, done, err = follow(created.ID, lastID)
		if done {
			return
		}
		fmt.Fprintln(os.Stderr, "connection lost, resuming after", lastID, err)
		time.Sleep(time.Second)
	}
}
