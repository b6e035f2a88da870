use serde::Deserialize;
use serde_json::{Value, json};

use super::manifest::{InjectError, inject_text, patch, to_yaml};
use super::*;

const DEPLOYMENT: &str = "
apiVersion: apps/v1
kind: Deployment
metadata: { name: web, namespace: shop }
spec:
  selector: { matchLabels: { app: web } }
  template:
    metadata: { labels: { app: web } }
    spec:
      containers:
        - name: app
          image: shop/web:1.2
          ports: [{ containerPort: 8080 }]
";

fn inject_one(text: &str, settings: &Settings) -> Value {
    let (docs, _) = inject_text(settings, "test.yaml", text).expect("injects");
    assert_eq!(docs.len(), 1);
    docs.into_iter().next().unwrap()
}

fn pod_spec(doc: &Value) -> &Value {
    &doc["spec"]["template"]["spec"]
}

#[test]
fn a_deployment_gets_a_native_sidecar_first_with_its_volume_and_annotation() {
    let doc = inject_one(DEPLOYMENT, &Settings::default());
    let spec = pod_spec(&doc);
    let sidecar = &spec["initContainers"][0];
    assert_eq!(sidecar["name"], "sidecar");
    assert_eq!(sidecar["restartPolicy"], "Always");
    assert_eq!(sidecar["args"], json!(["run", "-c", "/etc/sidecar/config/sidecar.yaml"]));
    assert_eq!(sidecar["startupProbe"]["httpGet"]["path"], "/live");
    assert_eq!(sidecar["readinessProbe"]["httpGet"]["port"], 15000);
    assert_eq!(
        sidecar["lifecycle"]["preStop"]["exec"]["command"],
        json!(["/sidecar", "drain", "--announce"])
    );
    assert_eq!(sidecar["securityContext"]["runAsNonRoot"], true);
    assert_eq!(sidecar["resources"]["requests"]["memory"], "32Mi");
    assert_eq!(sidecar["env"][3], json!({ "name": "CONTAINER_NAME", "value": "app" }));
    assert_eq!(spec["containers"][0]["name"], "app");
    assert_eq!(
        spec["volumes"],
        json!([{ "name": "sidecar-config", "configMap": { "name": "sidecar-config" } }])
    );
    assert_eq!(
        doc["spec"]["template"]["metadata"]["annotations"]["sidecar.dev/injected"],
        env!("CARGO_PKG_VERSION")
    );
}

#[test]
fn injecting_twice_equals_injecting_once_native_or_not() {
    for native in [true, false] {
        let settings = Settings { native, ..Settings::default() };
        let once = inject_one(DEPLOYMENT, &settings);
        let twice = inject_one(&to_yaml(std::slice::from_ref(&once)).unwrap(), &settings);
        assert_eq!(once, twice);
        let (p, _) = patch(&settings, &once).unwrap();
        assert!(p.0.is_empty(), "a second injection changes nothing: {p:?}");
    }
    // Switching mode moves the container rather than adding a second one.
    let native = inject_one(DEPLOYMENT, &Settings::default());
    let plain = Settings { native: false, ..Settings::default() };
    let moved = inject_one(&to_yaml(&[native]).unwrap(), &plain);
    assert_eq!(moved, inject_one(DEPLOYMENT, &plain));
    assert!(pod_spec(&moved).get("initContainers").is_none());
    assert_eq!(pod_spec(&moved)["containers"][0]["name"], "sidecar");
}

#[test]
fn annotations_set_the_config_map_tls_ports_and_resources() {
    let text = DEPLOYMENT.replace(
        "metadata: { labels: { app: web } }",
        "metadata:\n      labels: { app: web }\n      annotations:\n        sidecar.dev/config: web-sidecar\n        sidecar.dev/tls-secret: web-tls\n        sidecar.dev/ports: \"web:15006,tls:15443\"\n        sidecar.dev/admin-port: \"15100\"\n        sidecar.dev/memory-limit: none\n        sidecar.dev/cpu-limit: 500m",
    );
    let doc = inject_one(&text, &Settings::default());
    let spec = pod_spec(&doc);
    let sidecar = &spec["initContainers"][0];
    let ports: Vec<_> =
        sidecar["ports"].as_array().unwrap().iter().map(|p| p["containerPort"].clone()).collect();
    assert_eq!(ports, [json!(15100), json!(15006), json!(15443)]);
    assert_eq!(sidecar["livenessProbe"]["httpGet"]["port"], 15100);
    assert_eq!(sidecar["resources"]["limits"], json!({ "cpu": "500m" }));
    assert_eq!(spec["volumes"][0]["configMap"]["name"], "web-sidecar");
    assert_eq!(spec["volumes"][1]["secret"]["secretName"], "web-tls");
    assert_eq!(sidecar["volumeMounts"][1]["mountPath"], "/etc/sidecar/tls");
}

#[test]
fn bad_annotations_name_the_document_and_the_field() {
    for (annotation, field) in [
        ("sidecar.dev/admin-port: \"70000\"", "sidecar.dev/admin-port"),
        ("sidecar.dev/ports: \"Web_Port:1\"", "sidecar.dev/ports"),
        ("sidecar.dev/memory-request: lots", "sidecar.dev/memory-request"),
        ("sidecar.dev/config: Bad_Name", "sidecar.dev/config"),
    ] {
        let text = DEPLOYMENT.replace(
            "metadata: { labels: { app: web } }",
            &format!("metadata: {{ labels: {{ app: web }}, annotations: {{ {annotation} }} }}"),
        );
        let err = inject_text(&Settings::default(), "in.yaml", &text).unwrap_err().to_string();
        assert!(
            err.starts_with(&format!(
                "in.yaml: document 1 (deployment/web): spec.template.metadata.annotations.{field}: "
            )),
            "{err}"
        );
    }
}

#[test]
fn skipped_pods_and_other_kinds_pass_through_unchanged() {
    let text = "
apiVersion: v1
kind: Pod
metadata: { name: node-agent }
spec: { hostNetwork: true, containers: [{ name: a, image: x }] }
---
apiVersion: v1
kind: Pod
metadata: { name: legacy, annotations: { sidecar.dev/inject: disabled } }
spec: { containers: [{ name: a, image: x }] }
---
apiVersion: v1
kind: Service
metadata: { name: web }
spec: { ports: [{ port: 80, targetPort: sidecar-http }] }
---
";
    let (docs, lines) = inject_text(&Settings::default(), "in.yaml", text).unwrap();
    let input: Vec<Value> = serde_yaml_ng::Deserializer::from_str(text)
        .map(|d| Value::deserialize(d).unwrap())
        .filter(|v| !v.is_null())
        .collect();
    assert_eq!(docs, input);
    let shown: Vec<String> = lines.iter().map(ToString::to_string).collect();
    assert_eq!(
        shown,
        [
            "pod/node-agent skipped: hostNetwork: the sidecar's ports would be the node's",
            "pod/legacy skipped: annotated sidecar.dev/inject: disabled",
            "service/web passed through (no pod spec)",
        ]
    );
}

#[test]
fn lists_cronjobs_and_fields_unknown_to_the_schema_are_handled() {
    let text = r#"{"apiVersion": "v1", "kind": "List", "items": [
      {"apiVersion": "batch/v1", "kind": "CronJob", "metadata": {"name": "nightly"},
       "spec": {"schedule": "0 3 * * *", "jobTemplate": {"spec": {"template": {"spec": {
         "restartPolicy": "OnFailure", "futureField": {"kept": true},
         "containers": [{"name": "job", "image": "x"}]}}}}}}]}"#;
    let doc = inject_one(text, &Settings::default());
    let spec = &doc["items"][0]["spec"]["jobTemplate"]["spec"]["template"]["spec"];
    assert_eq!(spec["initContainers"][0]["name"], "sidecar");
    assert_eq!(spec["futureField"], json!({ "kept": true }));
}

#[test]
fn malformed_documents_are_errors_that_name_the_field() {
    let cases = [
        (
            "kind: Deployment\nmetadata: { name: a }\n",
            "in.yaml: document 1 (deployment/a): apiVersion: missing",
        ),
        (
            "apiVersion: extensions/v1beta1\nkind: Deployment\nmetadata: { name: a }\n",
            "in.yaml: document 1 (deployment/a): apiVersion: `extensions/v1beta1` Deployment is not supported: use apps/v1",
        ),
        (
            "apiVersion: v1\nkind: Pod\nmetadata: { name: a }\nspec: { containers: [{ name: a, ports: [{ containerPort: eighty }] }] }\n",
            "in.yaml: document 1 (pod/a): spec.containers[0].ports[0].containerPort: invalid type",
        ),
        ("apiVersion: v1\nkind: Pod\nmetadata: { name: a\n", "in.yaml: document 1: not valid YAML"),
    ];
    for (text, want) in cases {
        let err = inject_text(&Settings::default(), "in.yaml", text).unwrap_err();
        assert!(err.to_string().starts_with(want), "{err}");
        assert!(matches!(err, InjectError::Object { .. } | InjectError::Yaml { .. }));
    }
}

#[test]
fn a_container_named_sidecar_that_is_not_ours_is_refused() {
    let text = "apiVersion: v1\nkind: Pod\nmetadata: { name: a }\nspec: { containers: [{ name: sidecar, image: x }] }\n";
    let err = inject_text(&Settings::default(), "in.yaml", text).unwrap_err().to_string();
    assert!(err.contains("already has a container named `sidecar`"), "{err}");
}
