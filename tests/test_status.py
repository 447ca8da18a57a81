from modelfit.render import HASH_ANNOTATION
from modelfit.status import (
    apply_conditions,
    get_condition,
    planning_failure_conditions,
    pod_signals,
    set_condition,
    workload_conditions,
)


def test_transition_time_changes_only_on_flip():
    c = set_condition([], "Ready", "False", "ReplicasNotReady", "0/1", 1, now="t1")
    c = set_condition(c, "Ready", "False", "ReplicasNotReady", "still 0/1", 2, now="t2")
    ready = get_condition(c, "Ready")
    assert ready["lastTransitionTime"] == "t1" and ready["message"] == "still 0/1" and ready["observedGeneration"] == 2
    c = set_condition(c, "Ready", "True", "ReplicasReady", "1/1", 2, now="t3")
    assert get_condition(c, "Ready")["lastTransitionTime"] == "t3"


def test_conditions_sorted_and_unique():
    c = apply_conditions([], {"Unschedulable": ("False", "Scheduled", ""), "Ready": ("True", "ReplicasReady", "")}, 1)
    c = apply_conditions(c, {"Ready": ("True", "ReplicasReady", "")}, 1)
    assert [x["type"] for x in c] == ["Ready", "Unschedulable"]


def deploy(replicas=1, ready=1, updated=1, gen=1, observed=1, conditions=()):
    return {
        "metadata": {"generation": gen},
        "status": {
            "replicas": replicas,
            "readyReplicas": ready,
            "updatedReplicas": updated,
            "observedGeneration": observed,
            "conditions": list(conditions),
        },
    }


def test_ready_and_rollout_complete():
    v = workload_conditions(deploy(), [], 1)
    assert v["Ready"][:2] == ("True", "ReplicasReady")
    assert v["Progressing"][:2] == ("False", "RolloutComplete")
    assert v["Degraded"][:2] == ("False", "AsExpected") and v["Unschedulable"][:2] == ("False", "Scheduled")


def test_rolling_out_and_scaled_to_zero():
    assert workload_conditions(deploy(ready=0, updated=0), [], 1)["Progressing"][:2] == ("True", "RollingOut")
    assert workload_conditions(deploy(gen=2, observed=1), [], 1)["Progressing"][0] == "True"
    assert workload_conditions(deploy(0, 0, 0), [], 0)["Ready"][:2] == ("True", "ScaledToZero")
    stalled = deploy(
        ready=0, conditions=[{"type": "Progressing", "reason": "ProgressDeadlineExceeded", "message": "m"}]
    )
    assert workload_conditions(stalled, [], 1)["Progressing"][:2] == ("False", "ProgressDeadlineExceeded")


PENDING = {
    "metadata": {"name": "p1"},
    "status": {
        "phase": "Pending",
        "conditions": [
            {
                "type": "PodScheduled",
                "status": "False",
                "reason": "Unschedulable",
                "message": "0/3 nodes are available: 3 Insufficient memory.",
            }
        ],
    },
}


def test_failed_scheduling_carries_scheduler_message():
    v = workload_conditions(deploy(ready=0), [PENDING], 1)
    assert v["Unschedulable"] == ("True", "FailedScheduling", "0/3 nodes are available: 3 Insufficient memory.")
    assert v["Ready"][0] == "False" and "Insufficient memory" in v["Ready"][2]


def oom_pod(template_hash="h1"):
    return {
        "metadata": {"name": "p2", "annotations": {HASH_ANNOTATION: template_hash}},
        "status": {
            "phase": "Running",
            "containerStatuses": [
                {"name": "llama-server", "lastState": {"terminated": {"reason": "OOMKilled", "exitCode": 137}}}
            ],
        },
    }


def test_oom_killed_counts_only_current_template():
    assert pod_signals([oom_pod()], "h1").oom_killed == ["p2"]
    assert pod_signals([oom_pod("old")], "h1").oom_killed == []
    v = workload_conditions(deploy(ready=0), [oom_pod()], 1, "h1")
    assert v["Degraded"][:2] == ("True", "OOMKilled")


def test_download_failure_and_image_pull():
    pod = {
        "metadata": {"name": "p3"},
        "status": {
            "phase": "Pending",
            "initContainerStatuses": [
                {
                    "name": "fetch-model",
                    "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                    "lastState": {
                        "terminated": {
                            "exitCode": 1,
                            "message": "model download failed: HTTP error (404 or similar) for https://x\n",
                        }
                    },
                }
            ],
        },
    }
    v = workload_conditions(deploy(ready=0), [pod], 1)
    assert v["Degraded"] == (
        "True",
        "ModelDownloadFailed",
        "model download failed: HTTP error (404 or similar) for https://x",
    )
    pull = {
        "metadata": {"name": "p4"},
        "status": {
            "phase": "Pending",
            "containerStatuses": [
                {
                    "name": "llama-server",
                    "image": "bad:1",
                    "state": {"waiting": {"reason": "ImagePullBackOff", "message": "not found"}},
                }
            ],
        },
    }
    assert workload_conditions(deploy(ready=0), [pull], 1)["Degraded"][:2] == ("True", "ImagePullFailed")


def test_planning_failures():
    v = planning_failure_conditions("ModelUnreadable", "404")
    assert (
        v["Planned"] == ("False", "ModelUnreadable", "404")
        and v["Degraded"][0] == "True"
        and v["Ready"][1] == "NotPlanned"
    )
    v = planning_failure_conditions("NoNodeFits", "short")
    assert v["Unschedulable"] == ("True", "NoNodeFits", "short") and "Degraded" not in v


def test_missing_secret_from_the_kubelet_is_degraded():
    pod = {
        "metadata": {"name": "p"},
        "status": {
            "phase": "Pending",
            "containerStatuses": [
                {
                    "name": "llama-server",
                    "state": {
                        "waiting": {"reason": "CreateContainerConfigError", "message": 'secret "llm-key" not found'}
                    },
                }
            ],
        },
    }
    c = workload_conditions(deploy(ready=0), [pod], 1)
    assert c["Degraded"] == ("True", "ContainerConfigError", 'llama-server: secret "llm-key" not found')
    assert 'secret "llm-key" not found' in c["Ready"][2]


def test_api_failure_conditions_leave_planned_alone():
    from modelfit.status import api_failure_conditions

    c = api_failure_conditions("ApplyFailed", "Deployment x: HTTP 422: invalid")
    assert set(c) == {"Ready", "Progressing", "Degraded"} and c["Degraded"][:2] == ("True", "ApplyFailed")


def test_pods_the_replicaset_cannot_create_are_degraded():
    d = deploy(replicas=0, ready=0, updated=0)
    d["status"]["conditions"] = [
        {
            "type": "ReplicaFailure",
            "status": "True",
            "reason": "FailedCreate",
            "message": 'Pod "x-1" is invalid: spec.containers[0].image: must not have leading or trailing whitespace',
        }
    ]
    c = workload_conditions(d, [], 1)
    assert c["Degraded"][:2] == ("True", "PodCreateFailed") and "whitespace" in c["Degraded"][2]
    assert c["Ready"][0] == "False" and "whitespace" in c["Ready"][2]
