package tcsessions

import (
	"encoding/json"
	"net/netip"
	"reflect"
	"strings"
	"testing"
	"time"
)

func TestConfigDefaults(t *testing.T) {
	var c Config
	if err := c.normalize(); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(c.PodInterfaces, []string{SelectHostVeths}) || !reflect.DeepEqual(c.NodeInterfaces, []string{SelectDefaultRoute}) ||
		!c.TrackAll || c.Attach != AttachAuto || c.PayloadBytes != DefaultPayloadBytes || c.RingBytes != DefaultRingBytes ||
		c.MaxSessions != DefaultMaxSessions || c.FilterPriority != DefaultFilterPriority || c.StateDir != DefaultStateDir ||
		c.IdleFlush != DefaultIdleFlush || c.Logger == nil || c.ResponsePayloadBytes != DefaultResponsePayloadBytes ||
		c.WorkloadRefresh != DefaultWorkloadRefresh {
		t.Errorf("defaults %+v", c)
	}
	// Empty, non-nil selections select nothing; tables turn TrackAll off.
	c = Config{PodInterfaces: []string{}, NodeInterfaces: []string{}, Ports: []Port{{Port: 80}}, PayloadBytes: -1}
	if err := c.normalize(); err != nil {
		t.Fatal(err)
	}
	if len(c.PodInterfaces) != 0 || len(c.NodeInterfaces) != 0 || c.TrackAll || c.PayloadBytes != 0 || c.ResponsePayloadBytes != 0 {
		t.Errorf("%+v", c)
	}
	// The response prefix: at most the request's by default.
	c = Config{PayloadBytes: 200}
	if err := c.normalize(); err != nil || c.ResponsePayloadBytes != 200 {
		t.Errorf("%+v %v", c, err)
	}
	c = Config{PayloadBytes: 200, ResponsePayloadBytes: 4096}
	if err := c.normalize(); err != nil || c.ResponsePayloadBytes != 4096 {
		t.Errorf("%+v %v", c, err)
	}
}

func TestConfigErrors(t *testing.T) {
	for _, c := range []Config{
		{PodInterfaces: []string{"@pods"}},
		{NodeInterfaces: []string{"eth["}},
		{Ports: []Port{{Port: 0}}},
		{Ports: []Port{{Port: 80, Protocol: "gopher"}}},
		{Egress: []EgressMatch{{Port: 443}}},
		{Attach: "xdp"},
		{PayloadBytes: MaxPayloadBytes + 1},
		{RingBytes: 12345},
		{MaxSessions: -1},
	} {
		if err := c.normalize(); err == nil {
			t.Errorf("%+v: no error", c)
		}
	}
}

// TestConfigJSON: the configuration reads from JSON (and so from YAML with
// the same keys), prefixes as text.
func TestConfigJSON(t *testing.T) {
	js := `{"podInterfaces":["cali*","@veth"],"nodeInterfaces":["eth0"],
		"ports":[{"port":8080,"protocol":"http"},{"port":6379,"protocol":"redis","interface":"cali1"}],
		"egress":[{"prefix":"203.0.113.0/24","port":443,"protocol":"https"}],
		"ignorePorts":[4317],"attach":"clsact","payloadBytes":512,"idleFlush":2000000000}`
	var c Config
	if err := json.Unmarshal([]byte(js), &c); err != nil {
		t.Fatal(err)
	}
	if err := c.normalize(); err != nil {
		t.Fatal(err)
	}
	if c.Egress[0].Prefix != netip.MustParsePrefix("203.0.113.0/24") || c.Ports[1].Interface != "cali1" ||
		c.Attach != AttachClsact || c.IdleFlush != 2*time.Second || c.TrackAll {
		t.Errorf("%+v", c)
	}
	if !selects(c.PodInterfaces, "cali0abc") || selects(c.PodInterfaces, "eth0") || !selects(c.NodeInterfaces, "eth0") {
		t.Error("selection")
	}
}

func TestProtocolIDs(t *testing.T) {
	for i, p := range Protocols {
		id, err := ProtocolID(strings.ToUpper(p))
		if err != nil || int(id) != i || ProtocolName(id) != p {
			t.Errorf("%s: %d %v", p, id, err)
		}
	}
	if id, _ := ProtocolID(""); id != 0 {
		t.Error(`"" is not tcp`)
	}
	if id, _ := ProtocolID("ignore"); id != ProtocolIgnore || ProtocolName(ProtocolIgnore) != "ignore" {
		t.Error("ignore")
	}
}
