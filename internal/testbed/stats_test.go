package testbed

import (
	"slices"
	"testing"
)

func TestMedian(t *testing.T) {
	xs := []float64{120, 95, 97}
	for _, c := range []struct {
		xs   []float64
		want float64
	}{
		{nil, 0},
		{[]float64{98}, 98},
		{xs, 97},
		{[]float64{110, 90, 100, 100}, 100},
		{[]float64{4, 1, 3, 2}, 2.5},
	} {
		if got := Median(c.xs); got != c.want {
			t.Errorf("Median(%v) = %v, want %v", c.xs, got, c.want)
		}
	}
	if !slices.Equal(xs, []float64{120, 95, 97}) {
		t.Errorf("Median sorted its argument: %v", xs)
	}
}
